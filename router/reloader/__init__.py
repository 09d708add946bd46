"""The namespace reloader: KEDA as a child process with an up-to-date WATCH_NAMESPACE."""
