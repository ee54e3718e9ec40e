"""Write model folders in TotalSegmentator 2.18's exact on-disk (nnU-Net v2) layout.

TotalSegmentator's real weights cannot be downloaded here, so the project makes its own: phantom-trained small
networks (``scripts/make_phantom_weights.py``) and random weights of the realistic architecture for benchmarks
(``bench/make_random_weights.py``). Both go through this module so that the folder, ``dataset.json``,
``plans.json`` and checkpoint are exactly what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetPlans"

#: Output-space spacing (mm, isotropic) of each dataset, as TotalSegmentator resamples to it before nnU-Net.
TARGET_SPACING_MM = {291: 1.5, 292: 1.5, 293: 1.5, 294: 1.5, 295: 1.5, 297: 3.0, 298: 6.0}

#: nnU-Net plans import these arch kwargs by dotted name (``_kw_requires_import``).
_ARCH_IMPORTS = {
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "dropout_op": None,
    "nonlin": "torch.nn.LeakyReLU",
}


@dataclass(frozen=True)
class NetSpec:
    """A PlainConvUNet as nnU-Net's plans describe it; the first stage has stride 1, the others stride 2."""

    features: tuple[int, ...]
    patch_size: tuple[int, int, int]  # (z, y, x) voxels, nnU-Net's array order
    n_conv_per_stage: int = 2
    batch_size: int = 2
    strides: tuple[tuple[int, int, int], ...] | None = None

    def stage_strides(self) -> list[list[int]]:
        if self.strides is not None:
            return [list(s) for s in self.strides]
        return [[1, 1, 1]] + [[2, 2, 2]] * (len(self.features) - 1)


#: nnU-Net's default planner for a 3 mm CT (16.6 M parameters); what the benchmark's random weights use.
REALISTIC_3MM = NetSpec(features=(32, 64, 128, 256, 320), patch_size=(128, 112, 112))


@dataclass
class IntensityProperties:
    """``foreground_intensity_properties_per_channel['0']``: what ``CTNormalization`` clips and scales with."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    median: float = field(default=0.0)
    min: float = field(default=-1024.0)
    max: float = field(default=3071.0)

    @classmethod
    def from_cases(cls, cases, num_samples: int = 10000) -> IntensityProperties:
        """Pool foreground (label > 0) voxels of (ct, labels) arrays exactly as nnU-Net's fingerprint does."""
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
            DatasetFingerprintExtractor,
        )

        samples = []
        for ct, labels in cases:
            per_channel, _ = DatasetFingerprintExtractor.collect_foreground_intensities(
                np.asarray(labels)[None], np.asarray(ct, dtype=np.float32)[None], num_samples=num_samples
            )
            samples.append(per_channel[0])
        pooled = np.concatenate(samples)
        p005, median, p995 = np.percentile(pooled, (0.5, 50.0, 99.5))
        return cls(
            mean=float(pooled.mean()),
            std=float(pooled.std()),
            percentile_00_5=float(p005),
            percentile_99_5=float(p995),
            median=float(median),
            min=float(pooled.min()),
            max=float(pooled.max()),
        )

    def as_dict(self) -> dict:
        return {k: float(v) for k, v in self.__dict__.items()}

    def normalize(self, ct: np.ndarray) -> np.ndarray:
        """nnU-Net's ``CTNormalization`` (the same code path inference runs)."""
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
            CTNormalization,
        )

        return CTNormalization(use_mask_for_norm=False, intensityproperties=self.as_dict()).run(
            np.array(ct, dtype=np.float32)
        )


def folder_name(task_id: int) -> str:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    return TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"]


def trainer_name(task_id: int) -> str:
    """The trainer TotalSegmentator names in the results path (and nnU-Net reads from the checkpoint)."""
    return "nnUNetTrainer_4000epochs_NoMirroring" if task_id in (297, 298) else "nnUNetTrainerNoMirroring"


def model_dir(root: str | Path, task_id: int) -> Path:
    return Path(root) / folder_name(task_id) / f"{trainer_name(task_id)}__{PLANS_NAME}__{CONFIGURATION}"


def dataset_classes(task_id: int) -> dict[int, str]:
    """The dataset's own label ids (part models number their classes from 1) to TotalSegmentator names."""
    from totalsegmentator.map_to_binary import (
        class_map,
        class_map_5_parts,
        map_taskid_to_partname_ct,
    )

    if task_id in (297, 298):
        return dict(class_map["total"])
    return dict(class_map_5_parts[map_taskid_to_partname_ct[task_id]])


def make_dataset_json(task_id: int, num_training: int) -> dict:
    labels = {"background": 0} | {name: i for i, name in sorted(dataset_classes(task_id).items())}
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "name": folder_name(task_id).split("_", 1)[1],
    }


def make_plans(
    task_id: int,
    spec: NetSpec,
    intensity: IntensityProperties,
    median_shape: tuple[int, int, int] | None = None,
) -> dict:
    """A complete nnU-Net v2 plans file with only the ``3d_fullres`` configuration TotalSegmentator runs."""
    spacing = [TARGET_SPACING_MM[task_id]] * 3
    median = list(median_shape or spec.patch_size)
    return {
        "dataset_name": folder_name(task_id),
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": median,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: _configuration(spec, spacing, median)},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity.as_dict()},
    }


def _configuration(spec: NetSpec, spacing: list[float], median_shape: list[int]) -> dict:
    """The ``3d_fullres`` configuration: nnU-Net's defaults around the network ``spec`` describes."""
    n = len(spec.features)
    arch_kwargs = {
        "n_stages": n,
        "features_per_stage": list(spec.features),
        "conv_op": _ARCH_IMPORTS["conv_op"],
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": spec.stage_strides(),
        "n_conv_per_stage": [spec.n_conv_per_stage] * n,
        "n_conv_per_stage_decoder": [spec.n_conv_per_stage] * (n - 1),
        "conv_bias": True,
        "norm_op": _ARCH_IMPORTS["norm_op"],
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": _ARCH_IMPORTS["nonlin"],
        "nonlin_kwargs": {"inplace": True},
    }
    resample_data = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    resample_seg = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    resample_prob = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": spec.batch_size,
        "patch_size": list(spec.patch_size),
        "median_image_size_in_voxels": median_shape,
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample_data,
        "resampling_fn_seg_kwargs": resample_seg,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resample_prob,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": list(_ARCH_IMPORTS),
        },
        "batch_dice": False,
    }


def build_network(plans: dict, dataset_json: dict, task_id: int, deep_supervision: bool = False) -> torch.nn.Module:
    """The network exactly as inference will rebuild it: through the trainer class's own builder."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trainer_cls = recursive_find_trainer_class_by_name(trainer_name(task_id))
    plans_manager = PlansManager(plans)
    num_heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return trainer_cls.build_network_architecture(
        plans_manager,
        plans_manager.get_configuration(CONFIGURATION),
        len(dataset_json["channel_names"]),
        num_heads,
        enable_deep_supervision=deep_supervision,
    )


def write_model(
    root: str | Path,
    task_id: int,
    plans: dict,
    dataset_json: dict,
    network_weights: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write ``dataset.json``, ``plans.json`` and ``fold_0/checkpoint_final.pth``; random (He) init if no weights.

    The checkpoint holds what nnU-Net's predictor reads (``network_weights``, ``trainer_name``,
    ``init_args['configuration']``, ``inference_allowed_mirroring_axes``) and nothing bulky (no optimizer state).
    """
    out = model_dir(root, task_id)
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    if network_weights is None:
        torch.manual_seed(seed)
        network_weights = build_network(plans, dataset_json, task_id).state_dict()
    checkpoint = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in network_weights.items()},
        "trainer_name": trainer_name(task_id),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json},
        "inference_allowed_mirroring_axes": None,
        "current_epoch": 0,
    }
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    (out / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
    torch.save(checkpoint, out / "fold_0" / "checkpoint_final.pth")
    return out
