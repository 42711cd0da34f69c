#!/usr/bin/env python3
"""Container healthchecks of the OAL images (installed as /usr/local/bin/oal-healthcheck).

    oal-healthcheck api        GET http://127.0.0.1:$OAL_API_PORT/healthz answers 200
    oal-healthcheck dashboard  GET http://127.0.0.1:9181/ (rq-dashboard) answers 200
    oal-healthcheck worker     an RQ worker of this container is registered in Redis on $OAL_QUEUE_NAME
                               and its process is alive here

Why the worker check looks at Redis: RQ keeps a worker's key only while the worker heartbeats (the key
expires after worker_ttl + 60 s, and during a job after the job's timeout), so a registered key with this
container's hostname and a live pid means the worker loop is running, not merely that Python started.
Settings come from the same `OAL_*` variables the services read. Exit 0 healthy, 1 unhealthy; one line
on stdout says why (Docker keeps it in `docker inspect`).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request

HTTP_TIMEOUT_S = 5.0
#: The port docker-compose.yml starts rq-dashboard on (`--port 9181`); RQ_DASHBOARD_PORT changes it.
DASHBOARD_PORT = 9181


def _answers_200(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.status == 200, f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url} did not answer: {exc}"


def check_api() -> tuple[bool, str]:
    from oal_shared.settings import Settings

    return _answers_200(f"http://127.0.0.1:{Settings().api_port}/healthz")


def check_dashboard() -> tuple[bool, str]:
    # The dashboard image has no oal_shared; only the standard library here. A script rather than
    # `python -c "..."` in the compose file: podman's Docker-compatible API splits a healthcheck's
    # exec-form arguments at spaces, so `-c` got only the word `import`.
    return _answers_200(f"http://127.0.0.1:{os.environ.get('RQ_DASHBOARD_PORT', DASHBOARD_PORT)}/")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def check_worker() -> tuple[bool, str]:
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Queue, Worker
    from rq.serializers import JSONSerializer

    from oal_shared.settings import Settings

    settings = Settings()
    hostname = socket.gethostname()
    try:
        connection = Redis.from_url(
            settings.redis_url, socket_timeout=HTTP_TIMEOUT_S, socket_connect_timeout=HTTP_TIMEOUT_S
        )
        workers = Worker.all(queue=Queue(settings.queue_name, connection=connection, serializer=JSONSerializer))
    except RedisError as exc:
        return False, f"Redis at OAL_REDIS_URL={settings.redis_url} did not answer: {exc}"
    local = [w for w in workers if w.hostname == hostname]
    if not local:
        return False, f"no RQ worker of host {hostname} is registered on queue {settings.queue_name!r}"
    alive = [w for w in local if w.pid is not None and _process_alive(w.pid)]
    if not alive:
        pids = ", ".join(str(w.pid) for w in local)
        return False, f"RQ worker(s) of host {hostname} registered with pid {pids}, but no such process runs"
    return True, f"RQ worker {alive[0].name} (pid {alive[0].pid}) is {alive[0].get_state()}"


CHECKS = {"api": check_api, "dashboard": check_dashboard, "worker": check_worker}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in CHECKS:
        print(f"usage: oal-healthcheck {{{'|'.join(CHECKS)}}}", file=sys.stderr)  # noqa: T201 - a CLI
        return 2
    healthy, reason = CHECKS[args[0]]()
    print(reason)  # noqa: T201 - a CLI: Docker records this line
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
