"""Text streamed from the Hugging Face Hub with `datasets` (e.g. mC4's `allenai/c4/sw`)."""

from __future__ import annotations

import logging
import os

from dept_model.data.errors import DataSourceError

logger = logging.getLogger(__name__)

TEXT_FIELD = "text"
DEFAULT_LIMIT_BYTES = 64 << 20  # a stream such as mC4 never ends; without a limit read this much
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_FIX = (
    "use an embedded source (e.g. 'sw', see dept_model.data.list_sources()) or a local:/path spec, "
    "or go online and unset {vars}"
)


def parse_hub_spec(target: str) -> tuple[str, str | None]:
    """Split "NAME[/CONFIG]" into the dataset repo and config: "allenai/c4/sw" -> ("allenai/c4", "sw").

    One or two parts name the repo ("c4", "allenai/c4"); a third is the config.

    Raises:
        DataSourceError: for an empty name or more than three parts.
    """
    parts = target.strip("/").split("/")
    if not all(parts) or len(parts) > 3:
        raise DataSourceError(
            f"bad hf spec {target!r}: write hf:OWNER/NAME or hf:OWNER/NAME/CONFIG, e.g. hf:allenai/c4/sw"
        )
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2]
    return "/".join(parts), None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_VARS)


def read_hub(target: str, split: str, *, limit_bytes: int | None) -> list[str]:
    """Stream the first `limit_bytes` of text of a Hub dataset split.

    Args:
        target: "NAME[/CONFIG]" (see parse_hub_spec).
        split: "train", "validation" or "test", the Hub split of that name.
        limit_bytes: stop once this many UTF-8 bytes are read (default 64 MiB).

    Returns:
        Documents, in stream order; together at least `limit_bytes` long unless the split is shorter
        (load_texts cuts the last one).

    Raises:
        DataSourceError: offline (unless ``target`` is a local dataset folder), or when the dataset,
            config, split or `text` column cannot be had.
    """
    name, config = parse_hub_spec(target)
    limit = DEFAULT_LIMIT_BYTES if limit_bytes is None else limit_bytes
    # A local dataset folder (what `datasets.load_dataset(path)` reads) needs no network.
    if _offline() and not os.path.isdir(name):
        raise DataSourceError(
            f"hf:{target} needs the network but Hugging Face offline mode is on: "
            + _FIX.format(vars=" and ".join(_OFFLINE_VARS))
        )
    import datasets  # heavy import: only when a Hub spec is used

    docs: list[str] = []
    total = 0
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for row in stream:
            text = row.get(TEXT_FIELD)
            if not isinstance(text, str):
                raise DataSourceError(
                    f"hf:{target} rows have no string column {TEXT_FIELD!r} (columns: {sorted(row)}): "
                    "choose a dataset with a text column"
                )
            docs.append(text)
            total += len(text.encode("utf-8"))
            if total >= limit:
                break
    except DataSourceError:
        raise
    except Exception as err:  # datasets and huggingface_hub raise many unrelated types; wrap, never swallow
        raise DataSourceError(
            f"cannot stream hf:{target} (dataset {name!r}, config {config!r}, split {split!r}): {err}. "
            "Check the name, config and split and the network, or use an embedded source (e.g. 'sw') "
            "or a local:/path spec"
        ) from err
    logger.info(
        "hub_read dataset=%s config=%s split=%s docs=%d bytes=%d", name, config, split, len(docs), total
    )
    return docs
