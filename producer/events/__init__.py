"""Storage events become jobs: records parsing, duplicate absorption, and three sources
(an HTTP webhook, SQS long-polling, the SeaweedFS filer's metadata stream)."""
