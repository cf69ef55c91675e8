"""The actor: the one asyncio task that owns a tracker's runtime state, and what it
alone uses (its messages, timers, hub of subscriptions, runners). docs/architecture.md."""
