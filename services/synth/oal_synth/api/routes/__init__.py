"""One router per resource: jobs, generators, embedding sets, health."""
