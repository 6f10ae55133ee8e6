"""dept_comm.server: a parameter server that runs DiLoCo-style rounds over any named tensors.

- :class:`ParameterServer`: start, wait, stop a server over a ``{name: tensor}`` mapping.
- :class:`ServerConfig`: every setting (rounds, quorum, outer step, codecs, persistence, limits).
- :class:`ServerHooks`: what a trainer adds (join check, run description, resume identity, a
  tensor of which participants hold only rows, a metrics label, a round callback).
- :func:`check_resume_identity`, :func:`default_group_of`: the hooks' generic building blocks.

``dept-comm-server`` (``dept_comm.server.cli``) runs one from a safetensors file; DEPT's
``dept-server`` is this server with DEPT's hooks (``dept_server``).
"""

from dept_comm.accounting import RoundMetrics
from dept_comm.names import default_group_of

from .config import ServerConfig
from .hooks import ServerHooks, check_resume_identity
from .parameter_server import ParameterServer

__all__ = [
    "ParameterServer",
    "RoundMetrics",
    "ServerConfig",
    "ServerHooks",
    "check_resume_identity",
    "default_group_of",
]
