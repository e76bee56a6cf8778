"""Instructions and updates through a folder that the server and its client processes share.

Layout: ``<root>/instructions/<client_id>.npz`` (the server's latest message for the client: an instruction, an
evaluation request, or ``stop`` with the final global weights), ``<root>/updates/<client_id>.npz`` (the client's
answer to an instruction) and ``<root>/evaluations/<client_id>.npz`` (its answer to an evaluation request: a file of
its own, so that an update stays readable by a server that restarts and sends its instruction again). Each file is
the message's :meth:`~lightning_fedharmony.protocol.Instruction.to_arrays` form plus a JSON metadata entry, written
atomically (temporary file + ``os.replace``) and read with ``allow_pickle=False``. An instruction has an id (a digest
of its arrays and the attempt); an update names the id it answers, so an answer to an older instruction is never
taken for a newer one, and a server that restarts and sends the same instruction again accepts the answer that is
already there.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from lightning_fedharmony.exchange import FORMAT_VERSION, PayloadError, check_client_id, read_npz, write_npz
from lightning_fedharmony.faults import UpdateCollector
from lightning_fedharmony.protocol import Evaluation, Instruction, ProtocolError, Update
from lightning_fedharmony.transports.base import Transport

if TYPE_CHECKING:
    from lightning_fedharmony.orchestrator import Federation

log = logging.getLogger(__name__)

INSTRUCTION, STOP, UPDATE, EVALUATE, EVALUATION = "instruction", "stop", "update", "evaluate", "evaluation"
_FOLDERS = {INSTRUCTION: "instructions", STOP: "instructions", EVALUATE: "instructions", UPDATE: "updates"}


def instruction_id(arrays: Mapping[str, np.ndarray], attempt: int) -> str:
    """A digest of an instruction's arrays and its attempt: equal for the same message, whoever sends it."""
    digest = hashlib.sha256(f"attempt={attempt}".encode())
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


class FolderMailbox:
    """Both ends' access to the shared folder.

    Args:
        root: the shared folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, kind: str, client_id: str) -> Path:
        """``<root>/<kind>s/<client_id>.npz``."""
        folder = _FOLDERS.get(kind, "evaluations")
        return self.root / folder / f"{check_client_id(client_id)}.npz"

    def clear(self) -> None:
        """Remove every message (a fresh run in a used folder)."""
        for folder in ("instructions", "updates", "evaluations"):
            shutil.rmtree(self.root / folder, ignore_errors=True)

    # ------------------------------------------------------------------ server side
    def send_instruction(self, client_id: str, instruction: Instruction, attempt: int = 0) -> str:
        """Validate and write the client's instruction; returns its id."""
        instruction.validate(client_id)
        arrays = instruction.to_arrays()
        ident = instruction_id(arrays, attempt)
        meta = {"format_version": FORMAT_VERSION, "kind": INSTRUCTION, "client_id": client_id, "id": ident}
        write_npz(self.path(INSTRUCTION, client_id), arrays, meta)
        return ident

    def send_evaluate(self, client_id: str, request: Instruction) -> str:
        """Validate and write the client's evaluation request; returns its id (never that of an instruction)."""
        request.validate(client_id)
        arrays = request.to_arrays()
        ident = instruction_id({**arrays, "kind": np.asarray(EVALUATE)}, 0)
        meta = {"format_version": FORMAT_VERSION, "kind": EVALUATE, "client_id": client_id, "id": ident}
        write_npz(self.path(EVALUATE, client_id), arrays, meta)
        return ident

    def read_evaluation(self, client_id: str, answers: str, bins: int | None = None) -> Evaluation | None:
        """The client's evaluation if it answers request ``answers``; ``None`` if there is none yet.

        Raises:
            ProtocolError: a malformed evaluation, or one of another mode than ``bins`` (names the client and field).
        """
        meta, arrays = self._read(EVALUATION, client_id)
        if meta is None or meta.get("answers") != answers:
            return None
        return Evaluation.from_arrays(arrays, client_id=client_id, bins=bins)

    def send_stop(self, client_id: str, weights: Mapping[str, Tensor]) -> None:
        """Tell the client the run is over, with the final global weights."""
        arrays = Instruction(weights=dict(weights)).to_arrays()
        meta = {"format_version": FORMAT_VERSION, "kind": STOP, "client_id": client_id, "id": STOP}
        write_npz(self.path(STOP, client_id), arrays, meta)

    def read_update(self, client_id: str, answers: str) -> Update | None:
        """The client's update if it answers instruction ``answers``; ``None`` if there is none yet.

        Raises:
            ProtocolError: a malformed update (names the client and the field).
        """
        meta, arrays = self._read(UPDATE, client_id)
        if meta is None or meta.get("answers") != answers:
            return None
        return Update.from_arrays(arrays, client_id=client_id)

    # ------------------------------------------------------------------ client side
    def read_instruction(self, client_id: str) -> tuple[str, str, Instruction] | None:
        """``(kind, id, instruction)`` of the client's latest message (kind ``instruction``, ``evaluate`` or ``stop``),
        or ``None``.

        Raises:
            ProtocolError: a malformed instruction (names the client and the field).
        """
        meta, arrays = self._read(INSTRUCTION, client_id)
        if meta is None:
            return None
        kind, ident = meta.get("kind"), meta.get("id")
        if kind not in (INSTRUCTION, EVALUATE, STOP) or not isinstance(ident, str):
            raise ProtocolError(client_id, "kind", f"expected an instruction or stop message, but got {kind!r}.")
        return kind, ident, Instruction.from_arrays(arrays, client_id)

    def send_update(self, update: Update, answers: str) -> None:
        """Validate and write the client's update to instruction ``answers``."""
        update.validate()
        meta = {"format_version": FORMAT_VERSION, "kind": UPDATE, "client_id": update.client_id, "answers": answers}
        write_npz(self.path(UPDATE, update.client_id), update.to_arrays(), meta)

    def send_evaluation(self, evaluation: Evaluation, answers: str) -> None:
        """Validate and write the client's evaluation for request ``answers``."""
        evaluation.validate()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": EVALUATION,
            "client_id": evaluation.client_id,
            "answers": answers,
        }
        write_npz(self.path(EVALUATION, evaluation.client_id), evaluation.to_arrays(), meta)

    def _read(self, kind: str, client_id: str) -> tuple[dict | None, dict[str, np.ndarray]]:
        path = self.path(kind, client_id)
        if not path.exists():
            return None, {}
        try:
            arrays, meta = read_npz(path)
        except PayloadError as err:
            raise ProtocolError(client_id, "payload", str(err)) from None
        except FileNotFoundError:  # replaced between the check and the read
            return None, {}
        if meta.get("client_id") != client_id:
            raise ProtocolError(client_id, "client_id", f"{path} is for client {meta.get('client_id')!r}.")
        return meta, arrays


class FolderTransport(Transport):
    """Server side of the folder: write each selected client's instruction, wait for the answers.

    A client that has not answered ``client_timeout`` seconds after its instruction was written (the federation's
    setting; ``None`` waits for ever) is recorded as failed, and so is one whose update is malformed.

    Args:
        root: the shared folder.
        poll_interval: seconds between looks at the folder.
    """

    remote = True

    def __init__(self, root: str | os.PathLike[str], poll_interval: float = 0.05) -> None:
        if not poll_interval > 0:
            raise ValueError(f"Expected argument `poll_interval` to be > 0, but got {poll_interval!r}.")
        self.mailbox = FolderMailbox(root)
        self.poll_interval = float(poll_interval)

    def collect(
        self, federation: Federation, server_round: int, instructions: Mapping[str, Instruction], attempt: int
    ) -> UpdateCollector:
        pending = {cid: self.mailbox.send_instruction(cid, instr, attempt) for cid, instr in instructions.items()}
        log.info("round %d (attempt %d): sent instructions to clients %s", server_round, attempt + 1, list(pending))
        timeout = federation.client_timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        answers: dict[str, Update | str] = {}  # an update, or why there is none
        while pending:
            for cid in list(pending):
                try:
                    update = self.mailbox.read_update(cid, pending[cid])
                except ProtocolError as err:
                    answers[cid] = f"rejected update: {err}"
                    log.warning("round %d: %s", server_round, err)
                    del pending[cid]
                    continue
                if update is not None:
                    answers[cid] = update
                    log.info("round %d: update from client %s", server_round, cid)
                    del pending[cid]
            if pending and time.monotonic() >= deadline:
                for cid in pending:
                    answers[cid] = f"no update within client_timeout={timeout:g} s"
                log.warning("round %d: no update from clients %s within %g s", server_round, list(pending), timeout)
                break
            if pending:
                time.sleep(self.poll_interval)
        # screened in the order the clients were selected, not the order they answered: aggregation sums in this
        # order, and the same order as in memory gives the same weights bit for bit
        collected = federation.new_collector()
        for cid in instructions:
            answer = answers[cid]
            if isinstance(answer, str):
                collected.fail(cid, answer)
            else:
                collected.add(answer, answer.metrics.get("train_loss", float("nan")))
        return collected

    def evaluate(
        self, federation: Federation, server_round: int, requests: Mapping[str, Instruction]
    ) -> tuple[list[Evaluation], dict[str, str]]:
        pending = {cid: self.mailbox.send_evaluate(cid, request) for cid, request in requests.items()}
        bins = {cid: request.eval_bins for cid, request in requests.items()}
        timeout = federation.client_timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        answers: dict[str, Evaluation | str] = {}
        while pending:
            for cid in list(pending):
                try:
                    evaluation = self.mailbox.read_evaluation(cid, pending[cid], bins[cid])
                except ProtocolError as err:
                    answers[cid] = f"rejected evaluation: {err}"
                    del pending[cid]
                    continue
                if evaluation is not None:
                    answers[cid] = evaluation
                    del pending[cid]
            if pending and time.monotonic() >= deadline:
                answers.update({cid: f"no evaluation within client_timeout={timeout:g} s" for cid in pending})
                break
            if pending:
                time.sleep(self.poll_interval)
        evaluations = [a for cid in requests if isinstance(a := answers[cid], Evaluation)]
        failures = {cid: a for cid in requests if isinstance(a := answers[cid], str)}
        if failures:
            log.warning("round %d: evaluation failures %s", server_round, failures)
        return evaluations, failures

    def finish(self, federation: Federation) -> None:
        for cid in federation.clients:
            self.mailbox.send_stop(cid, federation.global_weights)
        log.info("sent stop to clients %s", list(federation.clients))
