"""Opens two accounts, deposits, transfers, retries the transfer (answered,
not applied again) and shows a refusal's details. Against `./scripts/up.sh`,
from the repository's root (the service certificate `service-cli` that
`cellbank up` wrote in data/local/certs):

    python clients/python/examples/transfer.py --target 127.0.0.1:7000

`--certs DIR --identity STEM --cluster NAME` for another cluster's
certificates (CELLBANK_CERTS and CELLBANK_IDENTITY set the first two, as
for the `cellbank` command); `--insecure` for a cluster started with
`insecure = true`.
"""

import argparse
import os

from cellbank_client import CellbankClient, CellbankError, Tls, result_name, settlement_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:7000", help="router address(es), comma-separated")
    parser.add_argument(
        "--certs",
        default=os.environ.get("CELLBANK_CERTS", "data/local/certs"),
        help="the cluster's certificate directory (ca.pem, <identity>.pem, <identity>.key)",
    )
    parser.add_argument(
        "--identity",
        default=os.environ.get("CELLBANK_IDENTITY", "service-cli"),
        help="the certificate to call with: its file stem in --certs",
    )
    parser.add_argument("--cluster", default="local", help="the cluster's name: servers prove <cluster>.cellbank")
    parser.add_argument("--insecure", action="store_true", help="plaintext, for a cluster started with insecure = true")
    args = parser.parse_args()

    # Mutual TLS: trust only the cluster's CA, prove who we are with the
    # service's certificate (plaintext only when asked for).
    tls = None if args.insecure else Tls.from_dir(args.certs, args.identity, cluster=args.cluster)

    with CellbankClient(args.target, tls=tls, insecure=args.insecure) as client:
        for user in (1, 3):
            opened = client.open_account(user, "CNY")  # OK, or ACCOUNT_ALREADY_EXISTS
            print(f"open user {user}: {result_name(opened.code)}")
        print("deposit:", result_name(client.deposit("example-seed-1", 1, 10_000).code))

        # The transfer id is the idempotency key: sending it again (after a
        # timeout, say) answers the recorded result and moves nothing.
        for attempt in (1, 2):
            result = client.transfer("example-order-42", from_user_id=1, to_user_id=3, amount=2_500)
            print(
                f"transfer attempt {attempt}: {result_name(result.code)} "
                f"settlement={settlement_name(result.settlement)} duplicate={result.duplicate}"
            )
        print("balances:", client.balance(1), client.balance(3))

        try:
            client.transfer("example-zero", from_user_id=1, to_user_id=3, amount=0)
        except CellbankError as refused:
            print(f"refused: {refused.code.name}, field={refused.field!r}, reason={refused.reason}")


if __name__ == "__main__":
    main()
