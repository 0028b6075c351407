"""Who is at the command line: the AWS principal `sts:GetCallerIdentity` names.

Never an environment variable: anyone can set one. The principal is the role session that
`gds aws … --shell` (or any AWS credentials) gives; `rotation.policy.operator` maps it to a
person with rotor.yml's `operators:`.
"""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from rotation.errors import NotAllowed

# Bounded like every network call: a stuck STS endpoint fails the command, it does not hang.
_STS_CONFIG = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2})


def caller_arn(region: str | None = None) -> str:
    """The ARN of the AWS principal this process's credentials belong to."""
    try:
        client = boto3.Session(region_name=region).client("sts", config=_STS_CONFIG)
        arn = client.get_caller_identity()["Arn"]
    except (BotoCoreError, ClientError) as exc:
        raise NotAllowed(f"cannot tell who you are: sts:GetCallerIdentity failed ({exc}); run "
                         "rotor with your AWS credentials (for example in `gds aws … --shell`)"
                         ) from exc
    return str(arn)
