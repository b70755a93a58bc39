"""Training batches as a pure function of (seed, step): the same run on any number of workers.

Data order. Epoch e visits the N samples in the order `permutation(N)` of a numpy
Generator(PCG64) seeded with (seed, e). The epochs are concatenated into one stream; global step s
takes stream positions [s*B, (s+1)*B), B the global batch size; worker r of W takes the contiguous
slice [r*B/W, (r+1)*B/W) of it. A batch may straddle two epochs (then a sample can appear twice).

Per-sample randomness. The sample at position j in [0, B) of step s draws everything random about
it from its own torch.Generator seeded with (seed, s, j), in this order:
    flip variant  v ~ U{0, .., V-1}            (only when V > 1 moment variants are given)
    latent noise  n ~ N(0, 1) [c, h, w]        z = (mean + std * n) * scale  (the VAE posterior sample)
    flow noise    eps ~ N(0, 1) [c, h, w]
    time          t ~ pipeline.flow.sample_time(uniform | lognormal)
    drop          u ~ U(0, 1); the label becomes the null class `num_classes` when u < class_dropout
    caption       k ~ U{0, .., count-1}       (text-to-image only: which of the image's captions)
so no value depends on the number of workers or loader processes: one worker at batch B computes
exactly the samples that two workers at B/2 compute between them.

Stores are read through callables over sorted, unique int64 indices:
    moments reader(indices) -> float32 [n, 2c, h, w]: channels [:c] posterior mean, [c:] posterior std
                                (one reader per stored variant: [moments] or [moments, moments_flip])
    teacher reader(indices) -> {name: array [n, ...]} (tokens [n, T, D] or hidden [n, T+1, D], fp16)
    text reader(indices)    -> {tokens [n, K, L, D], mask [n, K, L], pooled [n, K, D], count [n]}: K caption
                                slots per image, `count` of them its own (text-to-image). The condition
                                `y` is then {tokens [b, L, D], mask [b, L] bool, pooled [b, D], drop [b]
                                bool}: the drawn caption, and whether caption dropout hides it.
Teacher readers come one per variant too; a sample mirrored in the latent gets the mirrored image's
teacher features (a single teacher reader serves every variant). The batch's `flip` says which
samples were mirrored.

`TrainDataset` is a map-style torch Dataset whose item s is worker r's share of step s, so a
DataLoader(batch_size=None, sampler=range(start_step, steps)) resumes anywhere.

Loading ahead. `loader(..., workers=W, prefetch=P)` builds items ahead of the training step: in W
loader processes, P items each (DataLoader's prefetch_factor), or, with W = 0, in one background
thread of the training process, P items ahead (the store reads and the numpy/torch work release the
GIL). P = 0 with W = 0 builds each item when the loop asks for it. Loader processes start from a
fork server, never by forking the training process (tensorstore's thread pools do not survive a
fork: it aborts the child; nor does a CUDA context), so the dataset and its readers must pickle.

Teacher reads ahead of time. A loader process holds a copy of the dataset made when its iterator
started, so a decision the training process takes later (HASTE's termination) would never reach it.
`loader(..., read_teacher=f)` therefore keys items (step, f(step)): f is called in the training
process when step s is handed to a loader process or to the background thread (up to P x max(W, 1)
steps ahead), and the item holds teacher arrays for s only if f said so.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.flow import sample_time

Reader = Callable[[np.ndarray], np.ndarray]
TeacherReader = Callable[[np.ndarray], dict[str, np.ndarray]]


# ----------------------------------------------------------------------------------------------
#                                  Order and per-sample seeds
# ----------------------------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """int64 [n]: the order in which epoch `epoch` visits the samples."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n).astype(np.int64)


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator of the sample at `position` in the global batch of `step`."""
    words = np.random.SeedSequence([seed, step, position]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


def gather(reader: Callable, indices: np.ndarray):
    """reader(sorted unique indices), expanded back to `indices`' order (duplicates allowed)."""
    unique, inverse = np.unique(indices, return_inverse=True)
    out = reader(unique)
    if isinstance(out, dict):
        return {k: np.asarray(v)[inverse] for k, v in out.items()}
    return np.asarray(out)[inverse]


# ----------------------------------------------------------------------------------------------
#                                         The dataset
# ----------------------------------------------------------------------------------------------


class TrainDataset(Dataset):
    """Item s = this worker's micro batch of global step s, as a dict of tensors.

    x0 [b,c,h,w] float32 (scaled latent), eps [b,c,h,w] float32, t [b] float32, y [b] int64 (label
    dropout applied), index [b] int64 (sample rows), flip [b] int64 (moment variant), and
    teacher {name: tensor [b, ...]} only when a teacher reader is given and needs_teacher(s) holds (for
    a key (s, flag): when flag holds). b = batch_size / world_size.
    """

    def __init__(
        self,
        moments: Reader | Sequence[Reader],  # reader per stored variant (index 0 = as stored, 1 = mirrored)
        labels: np.ndarray,  # int [N] class labels; N defines the dataset size
        *,
        num_classes: int,  # the null label used for dropped labels is num_classes (0: unconditional, every y = 0)
        seed: int = 0,  # data order and per-sample noise
        class_dropout: float = 0.1,  # probability of replacing a label by the null class
        scale: float = 0.18215,  # VAE scaling factor multiplied into the latent sample
        time_sampling: str = "uniform",  # uniform | lognormal
        path: str = "linear",  # interpolant path (lognormal's sigma -> t map depends on it)
        teacher: TeacherReader | Sequence[TeacherReader] | None = None,  # teacher arrays, per variant like moments
        text: TeacherReader | None = None,  # caption slots per image (text-to-image; y becomes a dict)
        needs_teacher: Callable[[int], bool] | None = None,  # step -> read teacher arrays? None = always
        batch_size: int | None = None,  # global batch size (see `layout`)
        rank: int = 0,  # this worker
        world_size: int = 1,  # number of workers
    ):
        self.moments = list(moments) if isinstance(moments, Sequence) else [moments]
        if not self.moments:
            raise ValueError("TrainDataset needs at least one moments reader")
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.ndim != 1 or len(self.labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-d array, got shape {self.labels.shape}")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
        if time_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"time_sampling={time_sampling!r}; expected 'uniform' or 'lognormal'")
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.class_dropout = float(class_dropout)
        self.scale = float(scale)
        self.time_sampling = time_sampling
        self.path = path
        self.teacher = teacher
        self.text = text
        self.teachers = (list(teacher) if isinstance(teacher, Sequence) else [teacher]) if teacher is not None else []
        self.needs_teacher = needs_teacher
        self.teacher_reads = 0  # calls of the teacher reader (in this process)
        self._orders: dict[int, np.ndarray] = {}
        self.batch_size: int | None = None
        self.rank, self.world_size = 0, 1
        if batch_size is not None:
            self.layout(batch_size, rank, world_size)

    def __len__(self) -> int:
        """Number of samples N (items are addressed by step, without bound)."""
        return len(self.labels)

    def layout(self, batch_size: int, rank: int = 0, world_size: int = 1) -> TrainDataset:
        """Set the global batch size and this worker's place (in place); returns self."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid layout batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size={batch_size} is not divisible by the {world_size} workers: choose a "
                "multiple of train.num_workers"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        return self

    # -- which samples ----------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """Cached `epoch_order` of this dataset (two epochs kept)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self.seed, epoch, len(self.labels))
        return self._orders[epoch]

    def positions(self, step: int) -> np.ndarray:
        """int64 [b]: this worker's positions j within the global batch of `step`."""
        if self.batch_size is None:
            raise ValueError("TrainDataset.layout(batch_size, rank, world_size) must be called before reading batches")
        b = self.batch_size // self.world_size
        return np.arange(self.rank * b, (self.rank + 1) * b, dtype=np.int64)

    def indices(self, step: int) -> np.ndarray:
        """int64 [b]: the sample rows of this worker's share of `step`."""
        stream = step * self.batch_size + self.positions(step)
        n = len(self.labels)
        epochs, within = stream // n, stream % n
        out = np.empty_like(stream)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.order(int(e))[within[sel]]
        return out

    # -- one batch --------------------------------------------------------------------------------

    def __getitem__(self, key: int | tuple[int, bool | None]) -> dict:
        """Item `step`, or (step, teacher) as StepSampler yields it (see `item`)."""
        step, teacher = key if isinstance(key, tuple) else (key, None)
        return self.item(step, teacher)

    def item(self, step: int, teacher: bool | None = None) -> dict:
        """Item `step`; teacher: read the teacher arrays (True), not (False), or when needs_teacher(step)
        holds (None, what indexing does)."""
        step = int(step)
        if step < 0:
            raise IndexError(f"step {step} < 0")
        idx, pos = self.indices(step), self.positions(step)
        gens = [sample_generator(self.seed, step, int(j)) for j in pos]
        n_var = len(self.moments)
        flip = np.array(
            [int(torch.randint(n_var, (1,), generator=g)) if n_var > 1 else 0 for g in gens], dtype=np.int64
        )
        moments = None
        for v in range(n_var):
            sel = np.flatnonzero(flip == v)
            if len(sel) == 0:
                continue
            part = gather(self.moments[v], idx[sel]).astype(np.float32, copy=False)
            if moments is None:
                moments = np.empty((len(idx), *part.shape[1:]), np.float32)
            moments[sel] = part
        moments = torch.from_numpy(moments)
        c2 = moments.shape[1]
        if c2 % 2:
            raise ValueError(f"moments have {c2} channels; expected 2c (posterior mean then std)")
        mean, std = moments[:, : c2 // 2], moments[:, c2 // 2 :]
        shape = tuple(mean.shape[1:])
        noise, eps, t, drop = [], [], [], []
        for g in gens:
            noise.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            t.append(sample_time(1, self.time_sampling, self.path, generator=g))
            drop.append(torch.rand(1, generator=g))
        x0 = (mean + std * torch.stack(noise)) * self.scale
        dropped = torch.cat(drop) < self.class_dropout
        if self.text is not None:
            y = self.caption_condition(idx, gens, dropped)
        else:
            y = torch.from_numpy(self.labels[idx])
            y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
            if self.num_classes == 0:  # unconditional: the model reads no label
                y = torch.zeros_like(y)
        batch = {
            "x0": x0, "eps": torch.stack(eps), "t": torch.cat(t).float(), "y": y,
            "index": torch.from_numpy(idx), "flip": torch.from_numpy(flip),
        }
        if teacher is None:
            teacher = self.needs_teacher is None or self.needs_teacher(step)
        if self.teacher is not None and teacher:
            batch["teacher"] = self.teacher_arrays(idx, flip)
        return batch

    def caption_condition(self, idx: np.ndarray, gens: list[torch.Generator], dropped: torch.Tensor) -> dict:
        """y of a text-to-image batch: per sample one of its own captions, drawn from its generator
        (after everything else it draws, so the class-conditional streams are unchanged)."""
        arrays = gather(self.text, idx)
        count = np.asarray(arrays["count"], dtype=np.int64)
        pick = np.array([int(torch.randint(int(c), (1,), generator=g)) for c, g in zip(count, gens, strict=True)])
        rows = np.arange(len(idx))
        return {"tokens": torch.from_numpy(np.asarray(arrays["tokens"])[rows, pick].astype(np.float32)),
                "mask": torch.from_numpy(np.asarray(arrays["mask"])[rows, pick].astype(bool)),
                "pooled": torch.from_numpy(np.asarray(arrays["pooled"])[rows, pick].astype(np.float32)),
                "drop": dropped}

    def teacher_arrays(self, idx: np.ndarray | torch.Tensor, flip: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [b, ...]} teacher arrays of the samples `idx` [b] in their variants `flip` [b] (an item's
        "index" and "flip"; mirrored samples get the mirrored image's); one teacher read."""
        idx, flip = np.asarray(idx, dtype=np.int64), np.asarray(flip, dtype=np.int64)
        self.teacher_reads += 1
        out: dict[str, np.ndarray] = {}
        for v in np.unique(flip):
            sel = np.flatnonzero(flip == v)
            part = gather(self.teachers[min(int(v), len(self.teachers) - 1)], idx[sel])
            for k, a in part.items():
                if k not in out:
                    out[k] = np.empty((len(idx), *a.shape[1:]), a.dtype)
                out[k][sel] = a
        return {k: torch.from_numpy(v) for k, v in out.items()}

    # -- loading ----------------------------------------------------------------------------------

    def loader(
        self,
        start_step: int,  # first item
        steps: int,  # one past the last item
        workers: int = 0,  # loader processes (0 = items are built in this process)
        pin_memory: bool = False,  # page-locked batches (for CUDA)
        read_teacher: Callable[[int], bool] | None = None,  # step -> read its teacher arrays? (StepSampler)
        prefetch: int = 2,  # items built ahead per loader process, or by a thread when workers = 0
    ) -> Iterable[dict]:
        """Items start_step .. steps-1 in order, built ahead by `workers` processes or one thread."""
        if prefetch < 0 or workers < 0:
            raise ValueError(f"loader workers ({workers}) and prefetch ({prefetch}) must be >= 0")
        sampler = StepSampler(start_step, steps, read_teacher)
        if workers == 0 and prefetch > 0:
            return ThreadLoader(self, sampler, prefetch, pin_memory)
        return DataLoader(
            self, batch_size=None, sampler=sampler, num_workers=workers,
            pin_memory=pin_memory, prefetch_factor=max(1, prefetch) if workers > 0 else None,
            multiprocessing_context="forkserver" if workers > 0 else None,
        )


class ThreadLoader:
    """`dataset[key]` for the keys in order, built up to `depth` items ahead by one daemon thread.

    An error in the thread is raised in the consumer at the item that failed; leaving the iteration
    early stops the thread after the item it is building.
    """

    _END = object()

    def __init__(self, dataset: Dataset, keys: Iterable, depth: int, pin_memory: bool = False):
        self.dataset, self.keys, self.depth, self.pin_memory = dataset, keys, int(depth), pin_memory

    def __len__(self) -> int:
        return len(self.keys)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(entry: tuple) -> bool:
            while not stop.is_set():
                try:
                    slots.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for key in self.keys:
                    item = self.dataset[key]
                    if not put((_pin(item) if self.pin_memory else item, None)):
                        return
                put((self._END, None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                put((None, err))

        thread = threading.Thread(target=work, name="repa-loader", daemon=True)
        thread.start()
        try:
            while True:
                item, err = slots.get()
                if err is not None:
                    raise err
                if item is self._END:
                    return
                yield item
        finally:
            stop.set()


def _pin(item):
    """`item` with every tensor in page-locked memory (nested dicts followed)."""
    if isinstance(item, torch.Tensor):
        return item.pin_memory()
    if isinstance(item, dict):
        return {k: _pin(v) for k, v in item.items()}
    return item


class StepSampler(Sampler):
    """The keys start_step .. steps-1 of TrainDataset items, in order.

    With `read_teacher` each key is (step, read_teacher(step)), evaluated in the process iterating
    the sampler (the training process, also under loader processes) when the item is requested; without,
    the plain step (the dataset's own `needs_teacher` decides, in whichever process builds the item).
    """

    def __init__(self, start_step: int, steps: int, read_teacher: Callable[[int], bool] | None = None):
        self.start_step, self.steps, self.read_teacher = int(start_step), int(steps), read_teacher

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield step if self.read_teacher is None else (step, bool(self.read_teacher(step)))
