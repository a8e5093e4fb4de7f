"""The two resources (BaseModelDeployment, LoraAdapter): the single source of truth for the CRDs."""
