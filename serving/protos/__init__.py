"""Code generated from the .proto files under protos/ by protos/generate.py; do not edit.

Every message of these modules lives in DESCRIPTOR_POOL, not in protobuf's default pool: our `inference`
package defines the same symbols (`inference.ModelInferRequest`, ...) as tritonclient's generated code, and
two definitions of one symbol cannot share a pool. Serialised bytes are the same either way. Code that looks
descriptors up by name (e.g. gRPC server reflection) must be given this pool.
"""

from google.protobuf import descriptor_pool

__all__ = ["DESCRIPTOR_POOL"]

DESCRIPTOR_POOL = descriptor_pool.DescriptorPool()
"""The descriptor pool of every generated module under serving.protos."""
