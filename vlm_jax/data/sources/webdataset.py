"""WebDataset tar shards as a resumable stream of raw examples (local paths, globs, gs://...).

Members that share a key (`dir/0001.jpg`, `dir/0001.txt`, `dir/0001.json`: the key is the path up
to the first dot of the file name) form one example, as in the WebDataset convention:

    .jpg / .jpeg / .png / .webp   the image(s), kept as raw bytes (decoded by the transforms)
    .txt                          the caption (strict UTF-8)
    .json                         {"caption": str} and/or {"conversations": LLaVA turns}
Other extensions are ignored. Shards are sorted, dealt to processes by
`shard_index % process_count == process_index`, and streamed in order.

`iter(source)` gives a `WebDatasetIterator` with `get_state()` / `set_state()` (epoch, shard,
byte offset of the next example's first tar header), so a restored iterator continues exactly.
A bad example makes `next()` raise SkipExample *after* the iterator has moved past it, so the
caller counts it and simply calls `next()` again. Reasons: image_missing, caption_missing,
text_not_utf8, json_malformed, the LLaVA conversation reasons, shard_unreadable, and
tar_truncated / tar_corrupt, which end their shard (the rest of that shard is unreachable).
"""
from __future__ import annotations

import glob
import json
import re
import tarfile
from typing import Sequence

from etils import epath

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.sources.llava_json import parse_llava_conversation
from vlm_jax.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths, sorted: brace ranges ("shard-{000..099}.tar") and globs are expanded."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        for braced in _expand_braces(str(pattern)):
            if not any(char in braced for char in "*?["):
                paths.append(braced)
            elif "://" in braced:
                parent, _, name = braced.rpartition("/")
                paths.extend(str(p) for p in epath.Path(parent).glob(name))
            else:
                paths.extend(glob.glob(braced))
    if not paths:
        raise DataError(f"no tar shards match {list(patterns)}")
    return sorted(set(paths))


class WebDatasetSource:
    """This process's shards of a WebDataset; iterate it for raw examples.

    repeat: loop over the shards forever (the epoch is part of the iterator state).
    """

    def __init__(self, shards: str | Sequence[str], *, process_index: int = 0,
                 process_count: int = 1, repeat: bool = False):
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} outside [0, {process_count})")
        all_shards = expand_shards(shards)
        self.shards = [s for i, s in enumerate(all_shards) if i % process_count == process_index]
        if not self.shards:
            raise DataError(f"{len(all_shards)} shards leave none for process {process_index} of "
                            f"{process_count}: write at least one shard per process")
        self.repeat = repeat

    def __iter__(self) -> "WebDatasetIterator":
        return WebDatasetIterator(self.shards, self.repeat)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, first={self.shards[0]!r})"


class WebDatasetIterator:
    """Streams grouped tar members; state = {"epoch", "shard", "offset"}."""

    def __init__(self, shards: list[str], repeat: bool):
        self._shards, self._repeat = shards, repeat
        self._epoch, self._shard, self._offset = 0, 0, 0
        self._file = self._tar = None
        self._base = 0          # byte position in the shard where the open tar stream starts
        self._pending = None    # (header offset, name, TarInfo): next example's first member
        self._shard_of_group = 0

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "shard": self._shard, "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self._close()
        self._epoch, self._shard, self._offset = state["epoch"], state["shard"], state["offset"]

    def __iter__(self) -> "WebDatasetIterator":
        return self

    def __next__(self) -> dict:
        while True:
            if self._shard >= len(self._shards):
                if not self._repeat:
                    raise StopIteration
                self._epoch, self._shard, self._offset = self._epoch + 1, 0, 0
            if self._tar is None:
                self._open()
            group = self._read_group()
            if group is not None:
                return _group_to_example(self._shards[self._shard_of_group], *group)
            self._next_shard()

    def _open(self) -> None:
        path = self._shards[self._shard]
        try:
            self._file = epath.Path(path).open("rb")
            # Uncompressed shards resume by seeking; compressed ones re-read up to the offset.
            seekable = path.endswith(".tar")
            if seekable:
                self._file.seek(self._offset)
            self._base = self._offset if seekable else 0
            self._tar = tarfile.open(fileobj=self._file, mode="r|" if seekable else "r|*")
        except (OSError, tarfile.TarError) as error:
            self._next_shard()
            raise SkipExample("shard_unreadable", f"{path}: {error}") from error

    def _next_member(self):
        """(header offset, name, TarInfo) of the next regular file, or None at the archive's end.
        Its data is read only once it is known to belong to the example being assembled, so a
        shard cut inside a member still yields the complete example before it."""
        while True:
            info = self._tar.next()
            if info is None:
                return None
            if info.isfile() and self._base + info.offset >= self._offset:
                return self._base + info.offset, info.name, info

    def _read_data(self, info: tarfile.TarInfo) -> bytes:
        data = self._tar.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def _read_group(self):
        """(key, [(extension, data), ...]) of the next example, or None when the shard is done."""
        self._shard_of_group = self._shard
        key, members = None, []
        while True:
            try:
                member = self._pending if self._pending is not None else self._next_member()
                member_key, extension = _split_name(member[1]) if member else (None, None)
                if member is not None and key in (None, member_key):
                    members.append((extension, self._read_data(member[2])))
                    key, self._pending = member_key, None
                    continue
            except (tarfile.TarError, EOFError, OSError) as error:
                reason = "tar_truncated" if "unexpected end" in str(error) else "tar_corrupt"
                detail = f"{self._shards[self._shard]} after byte {self._offset}: {error}"
                self._next_shard()
                raise SkipExample(reason, detail) from error
            if member is None:
                if not self._ended_cleanly():
                    detail = f"{self._shards[self._shard]}: no end-of-archive block"
                    self._next_shard()  # a partial last example is dropped with the shard's end
                    raise SkipExample("tar_truncated", detail)
                if not members:
                    return None
                self._next_shard()  # this example was the shard's last
                return key, members
            self._pending, self._offset = member, member[0]  # first member of the next example
            return key, members

    def _ended_cleanly(self) -> bool:
        """tarfile stops silently at a header cut short; a complete archive has a zero block there.
        (Checked for uncompressed shards, where the end position can be re-read.)"""
        path = self._shards[self._shard]
        if not path.endswith(".tar"):
            return True
        with epath.Path(path).open("rb") as handle:
            handle.seek(self._base + self._tar.offset)
            end_block = handle.read(tarfile.BLOCKSIZE)
        return len(end_block) == tarfile.BLOCKSIZE and not end_block.strip(b"\0")

    def _next_shard(self) -> None:
        self._close()
        self._shard, self._offset = self._shard + 1, 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._file is not None:
            self._file.close()
        self._file = self._tar = self._pending = None


def _split_name(name: str) -> tuple[str, str]:
    directory, _, filename = name.rpartition("/")
    stem, _, extension = filename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _group_to_example(shard: str, key: str, members: list[tuple[str, bytes]]) -> dict:
    example_id = f"wds:{shard.rpartition('/')[2]}:{key}"
    images = [data for extension, data in members if extension in IMAGE_EXTENSIONS]
    caption, conversation_turns = None, None
    for extension, data in members:
        if extension == "txt":
            caption = _utf8(data, example_id).strip()
        elif extension == "json":
            try:
                record = json.loads(_utf8(data, example_id))
            except json.JSONDecodeError as error:
                raise SkipExample("json_malformed", f"{example_id}: {error}") from error
            if not isinstance(record, dict):
                raise SkipExample("json_malformed", f"{example_id}: .json is not an object")
            if caption is None and isinstance(record.get("caption"), str):
                caption = record["caption"].strip()
            conversation_turns = record.get("conversations", conversation_turns)
    conversation = None
    if conversation_turns is not None:
        conversation = parse_llava_conversation(conversation_turns, len(images), example_id)
    elif not images:
        raise SkipExample("image_missing", f"{example_id}: no image among "
                          f"{[extension for extension, _ in members]}")
    if conversation is None and not caption:
        raise SkipExample("caption_missing", f"{example_id}: no .txt and no json caption")
    return {"id": example_id, "images": images, "conversation": conversation, "caption": caption,
            "meta": {"source": "webdataset", "shard": shard, "key": key}}


def _utf8(data: bytes, example_id: str) -> str:
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise SkipExample("text_not_utf8", f"{example_id}: {error}") from error


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for number in range(int(first), int(last) + 1)
            for expanded in _expand_braces(f"{head}{number:0{width}d}{tail}")]
