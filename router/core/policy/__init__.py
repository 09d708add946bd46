"""Traffic boundaries (pure): policy config, tenant networks, intents, two renderers, plan."""
