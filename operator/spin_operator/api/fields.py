"""What the fields of the API share: the patterns strings must match (each with the help an error
message shows) and the limits of counts.
"""

from __future__ import annotations

from spin_operator.api.kube import DATA_KEY

MAX_ITERATIONS = 99
MAX_RETRIES = 9

_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
S3_OR_PATH = rf"^(s3://{_BUCKET}(/.*)?|file:///.*|/.*|\.{{1,2}}(/.*)?)$"
MODEL_URI = rf"^(s3://{_BUCKET}(/.*)?|file:///.*|/.*|\.{{1,2}}(/.*)?|[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?)$"
# A data file, a directory (trailing `/`, or a last segment without a suffix, which may also be a
# name prefix of shards such as data/train_sft-), or a glob in the last segment (train_sft-*).
DATASET_URI = (
    rf"^(s3://{_BUCKET}/.+|file:///.+|/.+|\.{{1,2}}/.+|[^:]+)"
    r"(\.(jsonl|json|parquet)|/|/[^/.*]+|/[^/]*\*[^/]*)$"
)
HTTP_OR_PATH = r"^(https?://[^\s]+|file:///.*|/.*|sqlite:///.+|databricks.*)$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# core/v1 resource.Quantity without a sign (a negative request or limit is refused): a number with
# at most one '.', then one binary (Ki..Ei), decimal (n, u, m, k, M..E) or exponent suffix.
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"

# What each pattern means, for error messages a person can act on.
PATTERN_HELP = {
    S3_OR_PATH: "s3://bucket/prefix or a local path",
    MODEL_URI: "s3://bucket/prefix, a local path, or a hub id such as org/model",
    DATASET_URI: (
        "s3://bucket/key or a local path: a .jsonl, .json or .parquet file, a directory "
        "(ending in /), a name prefix of shards (data/train_sft-) or a glob (data/train_sft-*)"
    ),
    HTTP_OR_PATH: "http(s):// URL, sqlite:///path or a local path",
    DNS_SUBDOMAIN: "Kubernetes name: lowercase letters, digits, '-' and '.'",
    QUANTITY: "a non-negative Kubernetes quantity such as 8, 500m, 1.5 or 64Gi",
    DATA_KEY: "a Secret key: letters, digits, '-', '_' and '.'",
}
