"""Blueprints: declarative kernel designs, the builders that ship with Esper, and the artifact format.

Importing this package registers the built-in families: ``lowrank_adapter``, ``residual_mlp``
and ``conv_adapter``.
"""

from esper.blueprints import conv_adapters, feature_adapters  # noqa: F401  (registers families)
from esper.blueprints.artifact import (
    KernelArtifact,
    create_artifact,
    decode_artifact,
    describe_artifact,
    encode_artifact,
    sha256_hex,
    verify_digest,
)
from esper.blueprints.registry import (
    BlueprintFamily,
    build_empty_kernel,
    build_kernel,
    check_compatible,
    family_names,
    get_family,
    initialize_kernel,
    is_compatible,
    parse_params,
    register_family,
    torch_dtype,
)

__all__ = [
    "BlueprintFamily",
    "KernelArtifact",
    "build_empty_kernel",
    "build_kernel",
    "check_compatible",
    "create_artifact",
    "decode_artifact",
    "describe_artifact",
    "encode_artifact",
    "family_names",
    "get_family",
    "initialize_kernel",
    "is_compatible",
    "parse_params",
    "register_family",
    "sha256_hex",
    "torch_dtype",
    "verify_digest",
]
