"""Generated protobuf and gRPC code for package dept.v1 (do not edit; see scripts/gen_proto.sh)."""
