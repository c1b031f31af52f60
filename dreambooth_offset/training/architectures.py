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

# SDXL 1.0 base's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2.6 B
# parameters. attention_head_dim is the number of heads per level (64 channels each).
SDXL_UNET_CONFIG = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
