"""Platform adapters: each translates one chat platform to and from the bridge's neutral messages."""
