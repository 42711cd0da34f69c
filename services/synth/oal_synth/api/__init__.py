"""The REST API of the synthesis service (FastAPI); `create_app` builds it. No torch in this process."""
