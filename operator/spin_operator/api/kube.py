"""Syntax rules of core Kubernetes values (label keys and values, quantities), as the API server
applies them (k8s.io/apimachinery validation and resource.Quantity), so the models refuse what a
real API server would refuse later, naming the field.
"""

from __future__ import annotations

import re
from decimal import Decimal

# A key of a Secret or ConfigMap (IsConfigMapKey); also a CRD pattern.
DATA_KEY = r"^[-._a-zA-Z0-9]+$"
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def label_key_error(key: str) -> str | None:
    """Why `key` is not a qualified name ([prefix/]name), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return f"{key!r} is not a valid label key: the prefix before '/' is empty"
    if prefix and (len(prefix) > 253 or not _PREFIX.match(prefix)):
        return f"{key!r} is not a valid label key: the prefix must be a DNS subdomain (lowercase letters, digits, '-', '.')"
    if not name or len(name) > 63 or not _NAME.match(name):
        return (
            f"{key!r} is not a valid label key: the name must be 1-63 characters of letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a valid label value, or None (empty is valid)."""
    if len(value) > 63 or not _VALUE.match(value):
        return (
            f"{value!r} is not a valid label value: at most 63 characters of letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )
    return None


def quantity_value(text: str) -> Decimal:
    """The value of a quantity (`500m` -> 0.5, `1Gi` -> 1073741824); ValueError if malformed."""
    m = _QUANTITY.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_DECIMAL[suffix])


def s3_uri_error(uri: str | None) -> str | None:
    """Why an s3:// URI cannot address objects (an empty, '.' or '..' segment), or None. The CRD
    pattern lets `s3://bkt/a/../b` through; S3 keys are not paths, so it would name another key."""
    if not uri or not uri.startswith("s3://"):
        return None
    key = uri[5:].partition("/")[2].strip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        return f"{uri!r}: an S3 key has no '.', '..' or empty path segments; write the prefix it should be"
    return None
