from foveal.cli import main

main()
