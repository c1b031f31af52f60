"""Published Stable Diffusion configs, for building models of the real size on the meta device or
with random weights (no download): the WebUI key maps and the benchmarks use them."""

# Stable Diffusion 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json); SD 2.x has
# the same module names.
SD15_UNET_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, sample_size=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
