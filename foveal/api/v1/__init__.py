"""Generated gRPC stubs of the ``foveal.v1`` protos (``make proto`` rewrites them; never edit).

``router_pb2`` holds the messages, ``router_pb2_grpc`` the ``Router`` service's stub, servicer
base class and ``add_RouterServicer_to_server``.
"""

from foveal.api.v1 import router_pb2, router_pb2_grpc

__all__ = ["router_pb2", "router_pb2_grpc"]
