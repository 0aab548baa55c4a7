"""nnU-Net's LocalLogger plus the GF-Screen curves, drawn as extra panels of progress.png."""
import matplotlib
import numpy as np

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import join  # noqa: E402

from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

GRL_KEYS = ("seg_losses", "grl_clip", "grl_kl", "grl_ce", "grl_losses", "glance_dense")
GLANCE_KEYS = ("mean_reward", "selection_ratio", "glance_sensitivity", "glance_specificity")
GFSCREEN_KEYS = GRL_KEYS + GLANCE_KEYS


class GFScreenLocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for key in GFSCREEN_KEYS:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict):
        # a checkpoint written before a key existed still resumes: pad it with NaN per epoch
        n_epochs = len(checkpoint.get("epoch_end_timestamps", []))
        for key in GFSCREEN_KEYS:
            checkpoint.setdefault(key, [float("nan")] * n_epochs)
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder: str):
        """nnU-Net's progress.png with two GF-Screen panels (GRL terms; Glance behaviour) appended below."""
        super().plot_progress_png(output_folder)
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        # same width and dpi as nnU-Net's 30 x 54 inch figure, so the two images stack exactly
        fig, (ax_loss, ax_glance) = plt.subplots(2, 1, figsize=(30, 30))
        for key, style in zip(GRL_KEYS, ("b-", "m-", "c-", "y-", "k--", "g:")):
            ax_loss.plot(x, log[key][:epoch + 1], style, label=key, linewidth=2)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(loc="upper right")
        ax_loss.set_title("Focus segmentation loss and GRL terms (train)")
        for key, style in zip(GLANCE_KEYS, ("g-", "r-", "b-", "k-")):
            ax_glance.plot(x, log[key][:epoch + 1], style, label=key, linewidth=2)
        ax_glance.set_ylim(-0.02, 1.02)
        ax_glance.set_xlabel("epoch")
        ax_glance.legend(loc="lower right")
        ax_glance.set_title("reward and selection ratio (train groups); Glance tile sensitivity/specificity (val)")
        fig.tight_layout()
        fig.canvas.draw()
        ours = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255
        plt.close(fig)
        path = join(output_folder, "progress.png")
        theirs = plt.imread(path)[..., :3]
        width = max(theirs.shape[1], ours.shape[1])
        pad = lambda im: np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=1.0)
        plt.imsave(path, np.concatenate([pad(theirs), pad(ours)], axis=0))
