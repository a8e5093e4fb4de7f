"""loraplane-router: one endpoint per base model that sends each request to a pod holding its adapter."""
