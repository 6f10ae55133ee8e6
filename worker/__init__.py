"""dept-worker: trains one data source and exchanges body updates with dept-server."""
