"""Where a run writes: artifact storage (`spec.storage`) and MLflow tracking (`spec.tracking`), with
the references to the Secrets that open them (values never appear in the spec).
"""

from __future__ import annotations

from typing import Annotated

from spin_operator.api.base import Model, UriModel, desc
from spin_operator.api.fields import DNS_SUBDOMAIN, HTTP_OR_PATH, S3_OR_PATH
from spin_operator.api.kube import DATA_KEY


class SecretRef(Model):
    """A reference to a Secret in the SPINRun's namespace. Values never appear in the spec."""

    name: Annotated[str, desc("Secret name.", pattern=DNS_SUBDOMAIN, max_length=253)]


class S3CredentialsSecretRef(SecretRef):
    """Secret holding S3 credentials; exposed to Jobs as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""

    access_key_id_key: Annotated[
        str,
        desc(
            "Key of the access key id in the Secret.",
            min_length=1,
            max_length=253,
            pattern=DATA_KEY,
        ),
    ] = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: Annotated[
        str,
        desc(
            "Key of the secret access key in the Secret.",
            min_length=1,
            max_length=253,
            pattern=DATA_KEY,
        ),
    ] = "AWS_SECRET_ACCESS_KEY"


class StorageSpec(UriModel):
    """Where checkpoints, generated data and manifests live."""

    uri: Annotated[
        str | None,
        desc(
            "Prefix (s3://bucket/prefix or a path); the run writes under <uri>/<namespace>/<name>. "
            "Defaults to the operator's setting.",
            pattern=S3_OR_PATH,
            max_length=1024,
        ),
    ] = None
    endpoint: Annotated[
        str | None,
        desc(
            "S3 endpoint URL for S3-compatible stores; the operator accepts only its default or endpoints its admin allows.",
            pattern=r"^https?://[^\s]+$",
        ),
    ] = None
    region: Annotated[str | None, desc("S3 region.", pattern=r"^[a-z0-9-]+$")] = None
    credentials_secret: Annotated[
        S3CredentialsSecretRef | None,
        desc("Secret with S3 credentials; none uses the pod's identity."),
    ] = None


class TrackingSpec(Model):
    """MLflow: one parent run per SPINRun, one nested run per iteration, a model version each."""

    uri: Annotated[
        str | None,
        desc(
            "MLflow tracking URI; defaults to the operator's setting. The operator accepts only its default or URIs its admin allows.",
            pattern=HTTP_OR_PATH,
        ),
    ] = None
    experiment: Annotated[
        str | None,
        desc(
            "Experiment name; defaults to the SPINRun's namespace. The operator accepts the namespace or `<namespace>/...` (or a name its admin allows).",
            min_length=1,
            max_length=500,
        ),
    ] = None
    registered_model: Annotated[
        str | None,
        desc(
            "Registered model name for the iterations' checkpoints; defaults to `<namespace>.<SPINRun name>`. The operator accepts `<namespace>.<name>` (or a name its admin allows).",
            min_length=1,
            max_length=256,
        ),
    ] = None
    credentials_secret: Annotated[
        SecretRef | None,
        desc("Secret with MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN keys."),
    ] = None
