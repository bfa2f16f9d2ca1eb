"""The fault suite: workers killed, the broker and the database restarted, a long soak."""
