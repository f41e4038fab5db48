"""DreamBooth training of a pack of subjects on one resident base model, from cached examples to checkpoints and
exported weights. One subject alone (`train_subject`) is a pack of one.

Read `PackTrainer.step` top to bottom: every resident subject draws its own micro-batch from its own RNG, each
instance sample conditioned on its own photo's prompt (the instance prompt, or curation's `instance_prompt, <caption>`)
→ the batches are noised by the base family's objective (noise prediction, or flow matching) and concatenated → one
denoiser pass (UNet or transformer), each sample through its own subject's LoRA slot → each subject's instance loss
+ λ·prior loss, each a mean over its own samples → one backward of their sum → each subject's own gradient
clipping, optimizer and LR-schedule step. The denoiser normalises and attends per sample, so a subject ends with the
weights it would have alone (tests/engine/diffusion/test_train.py and test_flux.py measure how close). What differs
by base is its family's (engine/diffusion/family.py): text encoding, latent layout, objective, guidance input.

Subjects join (`admit`) and leave (finished, or failed alone: a bad image, a NaN loss) between steps, so a freed
slot is refilled at once. Full fine-tunes train alone. Every `checkpointing_steps` of its own a subject's whole
state is saved; at its last step its weights are exported in diffusers' layout. `close()` leaves the base model as
it was found (see `BaseModel.reset`).

A subject with `data_parallel` N > 1 trains alone on N processes that joined one process group (engine/data_parallel):
each rank draws the subject's whole global micro-batch from the subject's RNG, as one process with N times the batch
would, and keeps its own rows; DistributedDataParallel averages the UNet's gradients (trained text encoders' are
averaged by hand); the logged losses are the global means. Rank 0 alone writes checkpoints, the log and the weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine import storage
from engine.diffusion import data_parallel
from engine.diffusion.base_model import BaseModel, text_encoder_checkpointing
from engine.diffusion.checkpoints import CheckpointError, load_latest_checkpoint
from engine.diffusion.families import family_of
from engine.diffusion.family import Noised, PromptEmbeddings
from engine.diffusion.instance_data import prepare_examples
from engine.diffusion.subject import CHECKPOINTS, WEIGHTS, Subject
from engine.diffusion.subject_training import (
    StepRecord,
    SubjectTraining,
    TrainResult,
    make_optimizer,
    training_identity,
    write_train_log,
)
from engine.diffusion.weights import attach_lora_pack, export_weights, trained_components
from engine.settings import Settings

# Settings every subject of one pack must share: they shape the model's layers or how the pass runs.
PACK_SHAPE_KEYS = (
    "mode", "lora_rank", "lora_target_modules", "text_encoder_lora_target_modules", "train_text_encoder",
    "gradient_checkpointing", "mixed_precision", "data_parallel", "resolution", "max_sequence_length",
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step is not applied, so the last checkpoint stays good."""


def pack_shape(settings: Settings) -> tuple:
    """Subjects whose settings give equal shapes can train in one pack."""
    return tuple(str(getattr(settings, key)) for key in PACK_SHAPE_KEYS)


@dataclass
class Ended:
    """A subject that left its pack: finished (weights exported, `result` set) or failed (`error` set)."""

    subject: Subject
    result: TrainResult | None = None
    error: BaseException | None = None


class PackTrainer:
    """Up to `capacity` subjects of one pack shape, training together on `base` (full fine-tunes and data-parallel
    subjects: one at a time)."""

    def __init__(self, base: BaseModel, settings: Settings, capacity: int):
        # This process's rank among the `world_size` processes training one subject data-parallel (1: alone), read
        # from the process group it joined beforehand (engine/data_parallel.join).
        self.rank, self.world_size = data_parallel.rank_and_world() if settings.data_parallel > 1 else (0, 1)
        if self.world_size != settings.data_parallel:
            raise ValueError(f"data_parallel={settings.data_parallel}, but this process is in a process group of "
                             f"{self.world_size}; join one of {settings.data_parallel} first (engine/data_parallel)")
        base.reset()
        self.base = base
        self.shape = pack_shape(settings)
        self.capacity = capacity if settings.mode == "lora" and self.world_size == 1 else 1
        self.members: dict[int, SubjectTraining] = {}
        self.train_text_encoder = settings.train_text_encoder
        self.gradient_checkpointing = settings.gradient_checkpointing
        self.autocast = settings.autocast(base.device.type)
        self.family = family_of(base)
        self.family.check(base, settings)  # the pack's shape settings (resolution, text encoders) fit this base
        self.pack = attach_lora_pack(base, settings, self.capacity) if settings.mode == "lora" else None
        # What the step calls: the base's denoiser (UNet or transformer), or its DistributedDataParallel wrapper
        self.denoiser: torch.nn.Module = base.denoiser
        self.averaged_by_hand: list[torch.nn.Parameter] = []  # data-parallel: trained weights outside the DDP wrapper
        self._prepare_modules()

    def _prepare_modules(self) -> None:
        names = self.base.text_encoder_names if self.train_text_encoder else ()
        text_encoders = [getattr(self.base, name) for name in names]
        for module in [self.base.denoiser, *text_encoders]:
            module.train()
        if not self.train_text_encoder:  # steps read cached embeddings: the encoders wait on the CPU until close()
            self.base.park_text_encoders()
        if self.gradient_checkpointing:
            self.base.denoiser.enable_gradient_checkpointing()
            for module in text_encoders:
                text_encoder_checkpointing(module, True)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.members)

    def fits(self, settings: Settings) -> bool:
        return self.free_slots > 0 and pack_shape(settings) == self.shape

    def close(self) -> None:
        """Take every adapter off and restore the base model; the trainer is not used again."""
        self.members.clear()
        self.denoiser, self.averaged_by_hand = self.base.denoiser, []  # the DDP wrapper and its gradient hooks go
        self.base.reset()

    # -- joining and leaving -----------------------------------------------------------------------------------

    def admit(
        self,
        subject: Subject,
        settings: Settings,
        subject_dir: str,
        class_image_uris: list[str] | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> SubjectTraining:
        """Give the subject a free slot, fresh or resumed from its newest checkpoint. A subject whose own input is bad
        (an image, a checkpoint of other settings) raises here and leaves the pack as it was. A data-parallel subject
        is admitted by every rank of the group at once (each reads the checkpoint), or by none."""
        try:
            member = self._take_slot(subject, settings, subject_dir, class_image_uris, on_step)
        except BaseException:
            if self.world_size > 1:
                with contextlib.suppress(data_parallel.PeerFailedError):
                    data_parallel.spread([0, -1])  # this rank's "no" to _start_data_parallel's question on the others
            raise
        if self.world_size > 1:
            self._start_data_parallel(member)
        self.members[member.slot] = member
        return member

    def _take_slot(
        self,
        subject: Subject,
        settings: Settings,
        subject_dir: str,
        class_image_uris: list[str] | None,
        on_step: Callable[[StepRecord], None] | None,
    ) -> SubjectTraining:
        from diffusers.optimization import get_scheduler

        if not self.fits(settings):
            raise ValueError(f"subject {subject.subject_id!r} does not fit this pack (full, or another pack shape)")
        self.family.check_rendering(self.base, settings)  # e.g. a FLUX.1 negative prompt: refused before training
        use_prior = settings.with_prior_preservation
        if use_prior and not class_image_uris:
            raise ValueError("with_prior_preservation is on but no class images were given")
        checkpoints_uri = storage.join(subject_dir, CHECKPOINTS)
        identity = training_identity(subject, settings, self.base)
        resume = load_latest_checkpoint(checkpoints_uri)
        if resume is not None and resume.extra.get("identity") != identity:
            raise CheckpointError(
                f"{checkpoints_uri}: the checkpoint at step {resume.step} was made with other training settings or "
                "inputs; remove the subject's checkpoints to start over"
            )
        examples = prepare_examples(
            self.base, subject.instance_images, subject.photo_prompts, settings,
            class_image_uris if use_prior else None, subject.class_prompt,
        )  # fmt: skip
        slot = next(s for s in range(self.capacity) if s not in self.members)
        params = self._attach_slot(slot, settings, subject.effective_seed)
        try:
            optimizer = make_optimizer(list(params.values()), settings, self.base.device)
            lr_scheduler = get_scheduler(
                settings.lr_scheduler, optimizer,
                num_warmup_steps=settings.lr_warmup_steps, num_training_steps=settings.max_train_steps,
            )  # fmt: skip
            precision = settings.effective_mixed_precision(self.base.device.type)
            scaler = torch.amp.GradScaler(self.base.device.type, enabled=precision == "fp16")
            member = SubjectTraining(
                subject, settings, subject_dir, slot, identity, examples, params, optimizer, lr_scheduler, scaler,
                torch.Generator().manual_seed(subject.effective_seed), on_step,
            )  # fmt: skip
            if resume is not None:
                if set(resume.trainable) != set(params):
                    raise CheckpointError(f"{checkpoints_uri}: the checkpoint's weights do not match the LoRA layout")
                with torch.no_grad():
                    for name, tensor in resume.trainable.items():
                        params[name].copy_(tensor)
                optimizer.load_state_dict(resume.optimizer)
                lr_scheduler.load_state_dict(resume.lr_scheduler)
                if resume.extra.get("scaler"):
                    scaler.load_state_dict(resume.extra["scaler"])
                member.generator.set_state(resume.rng["generator"])
                member.log, member.step, member.resumed_from = resume.extra["log"], resume.step, resume.step
        except BaseException:
            self._release(slot)
            raise
        return member

    def _start_data_parallel(self, member: SubjectTraining) -> None:
        """Once every rank has admitted the subject at the same step, wrap the UNet for DDP (which starts every rank
        from rank 0's weights); if any rank could not, none keeps it."""
        from torch.nn.parallel import DistributedDataParallel

        try:
            low, high = data_parallel.spread([1, member.step])
            if low[0] == 0:
                raise data_parallel.PeerFailedError("another rank of the group could not admit the subject")
            if low[1] != high[1]:
                raise data_parallel.PeerFailedError(
                    f"the ranks found different newest checkpoints (steps {low[1]:.0f} to {high[1]:.0f})"
                )
            # The slot's parameters require grad by now (LoRA slot, or every weight of a full fine-tune): DDP
            # reduces exactly those. Gradients as views of DDP's buckets: no second copy of a full fine-tune's.
            self.denoiser = DistributedDataParallel(self.base.denoiser, gradient_as_bucket_view=True)
        except BaseException:
            self._release(member.slot)
            raise
        in_denoiser = {id(p) for p in self.base.denoiser.parameters()}
        self.averaged_by_hand = [p for p in member.params.values() if id(p) not in in_denoiser]

    def _attach_slot(self, slot: int, settings: Settings, seed: int) -> dict[str, torch.nn.Parameter]:
        if self.pack is not None:
            # Its own init RNG: a subject's LoRA starts the same whichever slot and pack it lands in.
            self.pack.init_slot(slot, settings.effective_lora_alpha, torch.Generator().manual_seed(seed))
            return self.pack.parameters(slot)
        trainable = {}
        for prefix in trained_components(self.base, settings):
            module = getattr(self.base, prefix)
            self.base.snapshot(prefix)
            module.float()  # fully fine-tuned weights train in fp32, whatever the frozen storage dtype
            module.requires_grad_(True)
            trainable.update({f"{prefix}.{name}": p for name, p in module.named_parameters()})
        return trainable

    def _release(self, slot: int) -> None:
        self.members.pop(slot, None)
        if self.world_size > 1:  # a data-parallel subject trains alone: the DDP wrapper and its gradient hooks go
            self.denoiser, self.averaged_by_hand = self.base.denoiser, []
        if self.pack is not None:
            self.pack.clear_slot(slot)
        else:  # a full fine-tune: back to the base weights for whoever comes next
            self.base.reset()
            self._prepare_modules()

    def _finish(self, member: SubjectTraining) -> Ended:
        weights_uri = storage.join(member.subject_dir, WEIGHTS)
        if self.rank == 0:  # data-parallel: every rank holds the same weights and log; rank 0 writes them
            export_weights(self.base, member.settings, weights_uri, slot=member.slot)
            write_train_log(member.subject_dir, member.log)
        result = TrainResult(steps=member.settings.max_train_steps, log=member.log, resumed_from=member.resumed_from,
                             weights_uri=weights_uri)  # fmt: skip
        return Ended(member.subject, result=result)

    # -- one step of the whole pack ----------------------------------------------------------------------------

    def step(self) -> list[Ended]:
        """One micro-batch for every resident subject; returns those that finished or failed in it."""
        members = list(self.members.values())
        if not members:
            return []
        try:  # the routes stay set through the backward pass: gradient checkpointing reruns the forward there
            with self._gradient_sync(members):
                ended = self._forward_backward(members)
        finally:
            if self.pack is not None:
                self.pack.clear_routes()
        stepped = []
        for m in [m for m in members if m.slot in self.members and m.micro == m.settings.gradient_accumulation_steps]:
            try:
                record, finished = self._optimizer_step(m)
            except Exception as err:  # its checkpoint or export failed: that subject alone
                self._release(m.slot)
                ended.append(Ended(m.subject, error=err))
                continue
            stepped.append((m, record))
            if finished is not None:
                ended.append(finished)
        for m, record in stepped:  # after the whole pack has stepped: a callback that raises stops the pack whole
            if m.on_step is not None and self.rank == 0:
                m.on_step(record)
        return ended

    def _gradient_sync(self, members: list[SubjectTraining]) -> contextlib.AbstractContextManager:
        """Data-parallel: DDP averages the gradients in the backward of a step's last micro-batch; the micro-batches
        before it only accumulate them on each rank (DDP's `no_sync`, which must hold the forward too)."""
        m = members[0]
        if self.world_size > 1 and m.micro + 1 < m.settings.gradient_accumulation_steps:
            return self.denoiser.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, members: list[SubjectTraining]) -> list[Ended]:
        """The pack's micro-batch forward and backward; returns the subjects whose loss was not finite."""
        noised, photos = zip(*(self._sample(m) for m in members))
        embeddings, guidance = self._conditioning(members, photos)
        self._route(self.base.denoiser_name, [m.slot for m, part in zip(members, noised) for _ in part.timesteps])
        with self.autocast:
            prediction = self.family.predict(
                self.base, self.denoiser, Noised.cat(noised), embeddings, guidance, members[0].settings.resolution
            )

        losses, offset = [], 0
        for m, part in zip(members, noised):
            n = len(part.timesteps)
            losses.append(m.loss(prediction[offset : offset + n].float(), part))
            offset += n
        values = torch.stack([torch.stack(parts) for parts in losses]).detach()
        if self.world_size > 1:  # the global means: every rank logs, and finds non-finite, the same values
            values = data_parallel.mean(values)
        values = values.cpu().tolist()  # one sync for all
        ended: list[Ended] = []
        kept = []
        for m, parts, (loss, _, _) in zip(members, values, losses):
            if all(map(math.isfinite, parts)):
                kept.append((m, parts, loss))
                continue
            error = NonFiniteLossError(f"loss is {parts[0]} at step {m.step + 1}; lower learning_rate or use bf16")
            self._release(m.slot)
            ended.append(Ended(m.subject, error=error))
        if kept:
            # Each subject's loss reaches only its own slot's weights: their sum back-propagates as K separate losses.
            sum(m.scaler.scale(loss / m.settings.gradient_accumulation_steps) for m, _, loss in kept).backward()
        for m, parts, _ in kept:
            accumulation = m.settings.gradient_accumulation_steps
            m.totals = [t + v / accumulation for t, v in zip(m.totals, parts)]
            m.micro += 1
        return ended

    def _sample(self, m: SubjectTraining) -> tuple[Noised, torch.Tensor]:
        """The subject's micro-batch: instance (then class) latents, noised by the family's objective, all from its own
        RNG; and which instance photo each of its instance samples is (each trains with its own photo's prompt).

        Data-parallel, every rank draws the whole global micro-batch (train_batch_size x world_size), exactly as one
        process with that batch would, and keeps its own rows of the instance and of the class half: N ranks with
        batch B train as one process with batch N x B, and every rank's RNG stays where a checkpoint expects it."""
        bs, g, examples = m.settings.train_batch_size * self.world_size, m.generator, m.examples
        photos = torch.randint(len(examples.instance), (bs,), generator=g)
        latents = examples.instance.sample(photos, g)
        if examples.class_ is not None:
            class_latents = examples.class_.sample(torch.randint(len(examples.class_), (bs,), generator=g), g)
            latents = torch.cat([latents, class_latents])
        noised = self.family.noised(self.base, latents, g, m.settings)
        own = noised.rows(lambda batch: self._own_rows(batch, halves=latents.shape[0] // bs))
        return own, self._own_rows(photos, halves=1)

    def _own_rows(self, batch: torch.Tensor, halves: int) -> torch.Tensor:
        """This rank's rows of a global batch made of `halves` equal parts (instance, then class)."""
        if self.world_size == 1:
            return batch
        local = batch.shape[0] // (halves * self.world_size)
        rows = slice(self.rank * local, (self.rank + 1) * local)
        return torch.cat([part[rows] for part in batch.chunk(halves)])

    def _conditioning(self, members: list[SubjectTraining], photos: Sequence[torch.Tensor],
                      ) -> tuple[PromptEmbeddings, torch.Tensor | None]:  # fmt: skip
        """Each sample's prompt embeddings, one row per sample: an instance sample its own photo's prompt, a class
        sample the class prompt; cached, or (text encoders training) one routed pass over the prompts the micro-batch
        uses. And the samples' guidance input, where the base takes one ([dev]'s guidance embedding)."""
        # Per subject: the distinct prompts its instance samples use, and which of them each sample takes
        drawn = [torch.unique(m.examples.instance_prompt_of[p], return_inverse=True) for m, p in zip(members, photos)]
        if not self.train_text_encoder:
            instance = [m.examples.cached_embeddings["instance"].select(used) for m, (used, _) in zip(members, drawn)]
            class_ = [m.examples.cached_embeddings.get("class") for m in members]
        else:
            instance, class_ = self._encode_trained(members, [used for used, _ in drawn])
        out = []
        for (_, pick), own, prior in zip(drawn, instance, class_):
            priors = [prior.expand(len(pick))] if prior is not None else []
            out.append(PromptEmbeddings.cat([own.select(pick), *priors]))
        guidance = [self.family.guidance(self.base, m.settings, len(e.hidden)) for m, e in zip(members, out)]
        return PromptEmbeddings.cat(out), torch.cat(guidance) if guidance[0] is not None else None

    def _encode_trained(self, members: list[SubjectTraining], used: list[torch.Tensor],
                        ) -> tuple[list[PromptEmbeddings], list[PromptEmbeddings | None]]:  # fmt: skip
        """Each subject's instance prompts `used` (and its class prompt) through the training text encoders in one
        pass, each prompt through its subject's slot in every encoder."""
        ids, slots = [], []
        for m, rows in zip(members, used):
            ids.append(tuple(per_encoder[rows.to(per_encoder.device)] for per_encoder in m.examples.instance_ids))
            slots += [m.slot] * len(rows)
            if m.examples.class_ is not None:
                ids.append(m.examples.class_ids)
                slots.append(m.slot)
        for name in self.base.text_encoder_names:
            self._route(name, slots)
        with self.autocast:
            encoded = self.family.encode_ids(self.base, tuple(torch.cat(per_encoder) for per_encoder in zip(*ids)))
        instance, class_, offset = [], [], 0
        for m, rows in zip(members, used):
            instance.append(encoded.select(torch.arange(offset, offset + len(rows))))
            offset += len(rows)
            class_.append(encoded.select(torch.tensor([offset])) if m.examples.class_ is not None else None)
            offset += m.examples.class_ is not None
        return instance, class_

    def _route(self, component: str, slots: list[int]) -> None:
        if self.pack is not None:
            self.pack.route(component, slots)

    def _optimizer_step(self, m: SubjectTraining) -> tuple[StepRecord, Ended | None]:
        if self.averaged_by_hand:  # data-parallel: DDP averaged the UNet's gradients in the backward, not these
            data_parallel.average_gradients(self.averaged_by_hand)
        m.scaler.unscale_(m.optimizer)
        torch.nn.utils.clip_grad_norm_(list(m.params.values()), m.settings.max_grad_norm)
        m.scaler.step(m.optimizer)
        m.scaler.update()
        m.lr_scheduler.step()
        m.optimizer.zero_grad(set_to_none=True)
        m.step += 1
        now = time.perf_counter()
        record = StepRecord(m.step, *m.totals, m.lr_scheduler.get_last_lr()[0], now - m.step_began)
        m.log.append(record.__dict__)
        m.micro, m.totals, m.step_began = 0, [0.0, 0.0, 0.0], now
        last = m.step == m.settings.max_train_steps
        if self.rank == 0 and (m.step % m.settings.checkpointing_steps == 0 or last):  # ranks hold equal states
            m.checkpoint()
        ended = None
        if last:
            ended = self._finish(m)
            self._release(m.slot)
        return record, ended


@dataclass
class PackJob:
    """One subject to train in `train_pack`."""

    subject: Subject
    settings: Settings
    subject_dir: str
    class_image_uris: list[str] | None = None
    on_step: Callable[[StepRecord], None] | None = None


def train_pack(base: BaseModel, jobs: list[PackJob], capacity: int) -> list[Ended]:
    """Train `jobs` (of one pack shape) `capacity` at a time, refilling each freed slot at once; in the order they end."""
    queue = list(jobs)
    trainer = PackTrainer(base, queue[0].settings, capacity)
    ended: list[Ended] = []
    try:
        while queue or trainer.members:
            while queue and trainer.free_slots:
                job = queue.pop(0)
                try:
                    trainer.admit(job.subject, job.settings, job.subject_dir, job.class_image_uris, job.on_step)
                except Exception as err:
                    ended.append(Ended(job.subject, error=err))
            ended.extend(trainer.step())
    finally:
        trainer.close()
    return ended


def train_subject(
    base: BaseModel,
    subject: Subject,
    settings: Settings,
    subject_dir: str,
    class_image_uris: list[str] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Train one subject on `base` (a pack of one), checkpointing under `subject_dir`, resuming from its newest
    checkpoint. Raises the subject's error if it fails.

    With `data_parallel` N > 1, call it in each of N processes that joined one group (engine/data_parallel.join), all
    with the same arguments: each returns the same result; rank 0 alone writes, and alone calls `on_step`."""
    trainer = PackTrainer(base, settings, capacity=1)
    try:
        trainer.admit(subject, settings, subject_dir, class_image_uris, on_step)
        while True:
            for ended in trainer.step():
                if ended.error is not None:
                    raise ended.error
                return ended.result
    finally:
        trainer.close()
