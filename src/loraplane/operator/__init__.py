"""The kopf operator. Never imports torch."""
