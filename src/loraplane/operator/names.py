"""Names the operator gives and reads: child objects, labels, selectors, managers, finalizers.

Every child of a BaseModelDeployment is named from the deployment's name alone, so a reconcile
that runs twice (or after a restart) finds and updates the same objects.
"""

from loraplane.api import GROUP

FIELD_MANAGER = "loraplane-operator"
FINALIZER = f"{GROUP}/cleanup"
"""kopf's finalizer: on a LoraAdapter, held until every pod unloaded it; on a
BaseModelDeployment, until its fleet's daemon has stopped."""

# Labels on every child and on the runtime pods.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_BASE = f"{GROUP}/base-model"
"""The BaseModelDeployment a runtime pod serves: the selector of its fleet."""
ANNOTATION_RESTARTS = f"{GROUP}/runtime-restarts"

APP_NAME = "loraplane-runtime"
COMPONENT_RUNTIME = "runtime"
MANAGED_BY = "loraplane-operator"
RUNTIME_CONTAINER = "runtime"


def runtime_deployment(base: str) -> str:
    """The Deployment of a base's runtime pods: the base's own name, as users expect."""
    return base


def runtime_service(base: str) -> str:
    return base


def disruption_budget(base: str) -> str:
    return base


def admin_secret(base: str) -> str:
    """The Secret holding the admin token of a base's runtime pods."""
    return f"{base}-admin"


def selector_labels(base: str) -> dict[str, str]:
    """Labels that pick a base's runtime pods (the Deployment's selector: never changes)."""
    return {LABEL_BASE: base, LABEL_COMPONENT: COMPONENT_RUNTIME}


def child_labels(base: str) -> dict[str, str]:
    return {
        **selector_labels(base),
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: base,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def selector_string(base: str) -> str:
    """The pods' selector as status.selector shows it for the scale subresource."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(base).items()))
