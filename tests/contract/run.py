#!/usr/bin/env python3
"""The API contract, fuzzed: schemathesis against the gateway's /openapi.json on the running stack.

Starts the four release binaries as the benchmark does (tests/bench/bench.py's Stack: free loopback
ports, a broker namespace of its own, SQLite in a temporary directory), then runs schemathesis
against every operation in the document, with valid and invalid requests (`--mode all`), and every
check that applies to a stateless API. Fails on any 5xx, any status, header, content type or body
that the document does not describe, and any invalid request that is accepted.

    python3 tests/contract/run.py [--schemathesis PATH] [--max-examples N] [--target-dir DIR]

Called by .ci/run after the release build. Standard library only; schemathesis itself is installed
by .ci/run into a virtual environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench  # noqa: E402  (the benchmark's stack, reused rather than copied)

ADMIN_KEY = "contract-test-admin-key"

# Checks that do not apply, each with its reason. Everything else (`--checks all`) runs.
EXCLUDED_CHECKS = {
    # Needs a second user's credentials to try one user's resources with another's; the API has
    # one admin key and no per-user resources.
    "object_level_authorization",
    # Orders are never deleted (a cancelled order stays readable), so there is no "after free".
    "use_after_free",
    # "Every schema-valid request succeeds" cannot hold for a shop: an order of a well-formed but
    # unknown SKU is 422 and one for more than the stock is 409, and a price with three decimals
    # is 422 (JSON Schema's multipleOf cannot state "two decimals" for floats). Those answers are
    # checked all the same: documented status, problem document, no 5xx.
    "positive_data_acceptance",
}

# schemathesis's fuzzing and stateful phases repeat until their time budget is spent: 150 s gives
# every operation thousands of cases on 2 cores (about 5,000 in all). The run as a whole may take
# a minute more (start, coverage phase) before it counts as hung.
FUZZ_BUDGET_S = 150
RUN_BUDGET_S = FUZZ_BUDGET_S + 90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemathesis", default=shutil.which("schemathesis") or "schemathesis")
    parser.add_argument("--max-examples", type=int, default=int(os.environ.get("MAX_EXAMPLES", 50)))
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target")))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, DBs)")
    args = parser.parse_args()

    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    namespace = f"contract-{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="contract-"))
    # The admin key is the test's own, and the per-client rate limit stays on with its defaults
    # except that this single loopback client may go faster: the fuzzer is one client sending
    # thousands of requests, and its 429s would say nothing about the contract.
    os.environ.update(ADMIN_API_KEY=ADMIN_KEY, RATE_LIMIT_PER_SECOND="10000", RATE_LIMIT_BURST="10000")
    stack = bench.Stack(Path(args.target_dir) / "release", workdir, amqp_url, namespace)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        bench.log(f"contract: starting the stack in {workdir} (namespace {namespace})")
        stack.start()
        status, body = bench.http("PUT", stack["inventory"].url(f"/stock/{bench.SKU}"), {"onHand": bench.RESTOCK})
        if status != 200:
            raise SystemExit(f"contract: restock answered {status}: {body[:300]!r}")
        gateway = stack["gateway"].url("")
        command = [
            args.schemathesis, "run", f"{gateway}/openapi.json",
            "--url", gateway,
            "--mode", "all",
            "--checks", "all",
            "--exclude-checks", ",".join(sorted(EXCLUDED_CHECKS)),
            "--max-examples", str(args.max_examples),
            "--max-time", str(FUZZ_BUDGET_S),
            "--request-timeout", "10",
            "--header", f"x-api-key: {ADMIN_KEY}",
            "--seed", os.environ.get("SCHEMATHESIS_SEED", "1"),
            "--suppress-health-check", "too_slow",
            "--no-color",
        ]
        bench.log("contract: " + " ".join(command))
        # In the temporary directory: schemathesis keeps its state in .schemathesis/ of its cwd.
        result = subprocess.run(command, timeout=RUN_BUDGET_S, check=False, cwd=workdir)
        stack.check_alive()
        return result.returncode
    except subprocess.TimeoutExpired:
        bench.log(f"contract: schemathesis did not finish within {RUN_BUDGET_S} s")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stack.stop()
        try:
            bench.delete_topology(amqp_url, namespace)
        except OSError as error:
            bench.log(f"contract: cannot delete the broker topology of {namespace}: {error}")
        if args.keep:
            bench.log(f"contract: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
