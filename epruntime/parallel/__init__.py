"""Where a rank sits in the job: launcher detection, topology, process groups, health and host settings."""
