"""Gateway side of POLKU: route raw payloads to external plugins."""
