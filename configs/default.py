"""Every config field, with its default and meaning.

Experiment configs (configs/*.py) start from `get_config()` here and change what differs.
The returned config is locked by main.py: overriding a field that does not exist
(`--config.optim.lrr=1e-4`) fails at once and names the field.

Fields whose value may legitimately be "unset" use a typed placeholder, so that they
can still be set from the command line with the right type.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # master seed: params init, per-step noise (fold_in(step)), data order

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'digits'  # 'digits' | 'tfds:NAME' (e.g. 'tfds:cifar10') | 'folder:/path/to/images'
  data.image_size = 16  # training resolution in pixels (square); images are resized/cropped to it
  data.num_channels = 1  # 1 (grayscale) or 3 (RGB)
  data.split = 'train'  # tfds split (e.g. 'train', 'train[:90%]')
  data.image_key = 'image'  # feature holding the image, for tfds datasets
  data.label_key = 'label'  # feature holding the class label ('' = none)
  data.num_classes = 10  # number of classes the dataset's labels range over (0 = unlabelled)
  data.random_flip = False  # random horizontal flips (DDPM CIFAR-10)
  data.crop = 'none'  # 'none' | 'center' (largest center square) | 'celeba_ddim' (DDIM paper's CelebA box) | 'celeba_140' (NCSN/score_sde central 140x140)
  data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None = tfds default (~/tensorflow_datasets)
  data.num_workers = 0  # grain worker processes (0 = read in the main process)
  data.low_res_size = 0  # >0: also yield 'low_res' images of this size (super-resolution conditioning)
  # text models (model.context_dim > 0) only: where an example's caption(s) are. tfds: the text
  # feature, '/' for nesting (coco_captions: 'captions/text'; a list of captions: one is picked per
  # example and step). folder: any value; each image's caption is the same-named .txt beside it.
  # 'shapes' (the embedded captioned data): its 'caption'.
  data.caption_key = 'caption'

  # ---------------------------------------------------------------- text conditioning
  # The frozen text encoder of a text model (captions.py); its token states for the dataset's
  # captions are computed once and cached, so the encoder never runs in the train step.
  config.text = text = ml_collections.ConfigDict()
  text.encoder = 'minilm'  # 'minilm' (all-MiniLM-L6-v2, bundled) or a Hugging Face CLIP text folder
  text.cache_dir = ''  # where the cached states go; '' = WORKDIR/text_cache
  text.batch_size = 256  # prompts per encoder call while caching
  # what the model sees at the padding positions of the context_len token states:
  # 'mask' = zero states, masked out of the cross-attention; 'attend' = the encoder's own states
  # there and an all-True mask (Stable Diffusion attends to all 77 CLIP states, padding
  # included); 'auto' = 'attend' with model.pretrained, else 'mask'
  text.pad_tokens = 'auto'

  # ---------------------------------------------------------------- latent diffusion
  # A frozen autoencoder between pixels and the model (latent_space.py): the model then sees
  # data.image_size / f latents with the autoencoder's channels (SD's VAE: f = 8, 4 channels).
  config.latent = latent = ml_collections.ConfigDict()
  latent.autoencoder = ''  # diffusers AutoencoderKL folder (config.json + safetensors); '' = pixels
  latent.scale_factor = 0.0  # z_model = (z - shift) * scale; 0 = the folder's scaling_factor
  # LDM's scale_by_std: scale = 1 / std of the first training batch's latents (step 0's posterior
  # samples, every element, shift removed), fitted once when a run starts (scale_factor must be
  # 0), logged and saved as WORKDIR/latent_scale.json; resumes, --mode sample / eval and the
  # training grids / FID of that workdir read it from there.
  latent.scale_by_std = False
  # Train from WORKDIR/latent_cache (built once by `--mode cache_latents`, latent_cache.py): each
  # example's posterior mean and logvar, so the encoder does not run in the train step; every
  # step still draws its own posterior sample (keyed by the step, as without the cache). Needs
  # fixed data (data.random_flip = False); the cache's name hashes the autoencoder and config.data.
  latent.cache = False
  latent.shift_factor = config_dict.placeholder(float)  # None = the folder's (SD: 0)
  latent.factor = 8  # the autoencoder's downsampling (2**(levels - 1)); SD's VAE: 8
  latent.channels = 4  # its latent channels; SD's VAE: 4
  latent.sample_posterior = True  # train on posterior samples (LDM) rather than the mean
  latent.dtype = 'float32'  # the autoencoder's compute dtype ('bfloat16' on accelerators)

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'  # 'unet' | 'dit' | 'sd_unet' | 'autoencoder' (models/__init__.py)
  model.ch = 64  # base channel count
  model.ch_mult = (1, 2, 2)  # channel multiplier per resolution level
  model.num_res_blocks = 2  # residual blocks per level (the up path has one more)
  model.attn_resolutions = (8,)  # feature-map sizes (pixels) that get self-attention
  model.num_heads = 1  # attention heads
  model.dropout = 0.1  # dropout rate inside residual blocks
  model.resamp_with_conv = True  # learned conv in down/upsampling (DDPM) vs. plain pooling/nearest
  model.num_classes = 0  # >0: class-conditional (label embedding added to the time embedding)
  model.cond_channels = 0  # >0: image-conditional; the condition image is concatenated on channels
  model.dtype = 'float32'  # activation/compute dtype ('float32' or 'bfloat16'); params stay float32
  model.remat = False  # rematerialize residual blocks in the backward pass (saves memory)
  model.num_groups = 32  # GroupNorm groups (narrow layers use fewer: models.layers.group_count)
  # 3x3 convs of the U-Net's residual blocks and upsampling: 'auto' (Winograd where it measured
  # faster on the CPU, see models/winograd.py) | 'direct' | 'winograd' (F(2x2)) | 'winograd4'
  model.conv_algorithm = 'auto'
  # text conditioning (conditioning.Text): 0 = no text; else the text encoder's width D, and the
  # U-Net adds cross-attention on the [B, L, D] token states after every self-attention block
  # (e.g. 384 for MiniLM, 768 for CLIP ViT-L/14)
  model.context_dim = 0
  model.context_len = 77  # L: the token length of the cached text states (CLIP's 77)
  # A Stable Diffusion 1.x / 2.x folder in diffusers' layout (unet/, vae/, text_encoder/,
  # tokenizer/; model_index.json and scheduler/ optional), model.name = 'sd_unet' only; '' = none.
  # It defines the model (config_lib.apply_pretrained, run by validate, logs what it changes):
  #   config.sd_unet's architecture fields and model.context_dim <- unet/config.json (the folder
  #     wins over the config file; sd_unet.dropout and sd_unet.attention_impl stay the config's)
  #   latent.autoencoder, if ''                           <- FOLDER/vae
  #   text.encoder, if 'minilm' (the default) or ''       <- FOLDER/text_encoder (+ ../tokenizer)
  #   text.pad_tokens 'auto'                              -> 'attend' (SD's conditioning)
  # and, if it has scheduler/scheduler_config.json, its prediction_type must be
  # diffusion.prediction (the betas are only compared, with a warning).
  # Training starts from unet/'s weights (params and EMA) instead of a random init; a resumed
  # run restores its checkpoint. --mode sample / eval use the workdir's newest checkpoint when
  # there is one (the fine-tuned weights), else unet/'s (outputs named pretrained_...).
  model.pretrained = ''

  # ---------------------------------------------------------------- DiT (model.name = 'dit')
  # Peebles & Xie 2023; only read when model.name = 'dit' (the U-Net fields above do not apply).
  # The paper's sizes: configs/dit_{s2,b2,l2,xl2}.py; models/dit.py's SIZES.
  config.dit = dit = ml_collections.ConfigDict()
  dit.patch_size = 2  # input pixels (or latent cells) per token side
  dit.hidden_size = 384  # token width (DiT-S)
  dit.depth = 12  # DiT blocks
  dit.num_heads = 6  # attention heads (must divide hidden_size)
  dit.mlp_ratio = 4.0  # MLP width / hidden_size
  # 2C outputs, the second half IDDPM's variance interpolation, as the released checkpoints have;
  # that half is not trained here (no VLB term) and sampling uses the fixed variance.
  dit.learn_sigma = False

  # ---------------------------------------------------------------- SD U-Net (model.name 'sd_unet')
  # Stable Diffusion 1.x / 2.x's U-Net (diffusers' UNet2DConditionModel, models/sd_unet.py); only
  # read when model.name = 'sd_unet' (the U-Net fields above do not apply; model.dtype and
  # model.remat do). Field names and meanings are diffusers' config.json's; the defaults are SD
  # 1.5's architecture (configs/sd15.py; a tiny one: configs/shapes_sd_tiny.py).
  # models.load_diffusers_unet(folder) builds the same group from a folder's config.json.
  config.sd_unet = sd = ml_collections.ConfigDict()
  sd.in_channels = 0  # channels of x; 0 = what is denoised (latent.channels / data.num_channels)
  sd.out_channels = 0  # channels of the prediction; 0 = in_channels
  sd.sample_size = 64  # the latent size the weights were trained at (informational; SD 1.5: 64)
  sd.block_out_channels = (320, 640, 1280, 1280)  # per block; x's side must divide by 2**(n-1)
  sd.layers_per_block = 2  # resnets per down block (int or one per block); up blocks have one more
  # per block, in down order; up blocks are listed in their own (reversed-resolution) order
  sd.down_block_types = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  sd.up_block_types = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  # diffusers' name for the NUMBER OF HEADS in this model (int, or one per block: SD 2.x's
  # (5, 10, 20, 20)); head width = channels / heads. SD 1.x: 8.
  sd.attention_head_dim = 8
  sd.transformer_layers_per_block = 1  # BasicTransformerBlocks per Transformer2D (int or per block)
  sd.cross_attention_dim = 0  # width of the text states; 0 = model.context_dim (SD 1.x: 768)
  sd.use_linear_projection = False  # proj_in / proj_out linear (SD 2.x), not 1x1 convs (SD 1.x)
  sd.norm_num_groups = 32  # GroupNorm groups, exactly (must divide every channel count)
  sd.norm_eps = 1e-5  # resnets' and conv_norm_out's GroupNorm eps (the transformers' is 1e-6)
  sd.flip_sin_to_cos = True  # timestep features cos first (SD: True)
  sd.freq_shift = 0  # timestep frequencies 10000^(-i / (half - freq_shift)) (SD: 0)
  sd.downsample_padding = 1  # padding of the stride-2 convs (SD: 1; 0 pads (0, 1) as diffusers)
  sd.dropout = 0.0  # inside every resnet, train=True only (SD: 0)
  # jax.nn.dot_product_attention's implementation: '' = XLA (any backend), 'cudnn' = cuDNN's fused
  # kernel (NVIDIA GPUs, model.dtype='bfloat16' only)
  sd.attention_impl = ''

  # ---------------------------------------------------------------- KL autoencoder
  # model.name = 'autoencoder' trains this autoencoder (models/autoencoder.py: diffusers'
  # AutoencoderKL) with config.autoencoder_loss instead of a denoiser; a latent diffusion config
  # then names the run's workdir in latent.autoencoder. Defaults: Stable Diffusion's VAE
  # (83,653,863 parameters); tiny ones: configs/shapes_autoencoder.py, configs/digits_autoencoder.py.
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.in_channels = 0  # image channels; 0 = data.num_channels
  ae.out_channels = 0  # reconstructed channels; 0 = data.num_channels
  ae.block_out_channels = (128, 256, 512, 512)  # channels per level; downsampling 2**(levels-1)
  ae.layers_per_block = 2  # resnets per encoder level (the decoder has one more)
  ae.latent_channels = 4
  ae.norm_num_groups = 32  # GroupNorm groups, exactly (must divide every level's channels)
  ae.scaling_factor = 0.18215  # carried into a latent run: (z - shift_factor) * scaling_factor
  ae.shift_factor = 0.0
  ae.mid_block_add_attention = True  # self-attention in both mid blocks
  ae.use_quant_conv = True  # 1x1 conv after the encoder
  ae.use_post_quant_conv = True  # 1x1 conv before the decoder
  ae.dtype = 'float32'  # compute dtype ('float32' | 'bfloat16'); params stay float32

  # The autoencoder's objective (models/autoencoder_loss.py; LDM's kl-f8 defaults): summed L1 or
  # L2 reconstruction + kl_weight * summed KL, and from step disc_start LDM's PatchGAN hinge loss
  # with its adaptive weight. LPIPS, LDM's perceptual term, is left out: its VGG weights cannot be
  # downloaded here.
  config.autoencoder_loss = al = ml_collections.ConfigDict()
  al.rec_loss = 'l1'  # 'l1' | 'l2'
  al.kl_weight = 1e-6  # weight of the KL (nats, summed over latents)
  al.disc_start = 50001  # step from which the GAN terms count (0 = from the start)
  al.disc_weight = 0.5  # multiplies the adaptive weight
  al.disc_factor = 1.0  # GAN factor once step >= disc_start (0 = no discriminator at all)
  al.disc_loss = 'hinge'  # 'hinge' | 'vanilla' (softplus)
  al.disc_num_layers = 3  # stride-2 convs of the PatchGAN (3: 70x70 receptive field)
  al.disc_channels = 64  # width of its first conv (doubling per layer, at most 8x)
  al.disc_norm = 'group'  # 'group' | 'none' (LDM: BatchNorm, which a pure loss cannot thread)

  # ---------------------------------------------------------------- diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'linear'  # 'linear' (DDPM) | 'cosine' (Nichol & Dhariwal) | 'scaled_linear' (SD)
  diffusion.num_timesteps = 1000  # T
  diffusion.beta_start = 1e-4  # linear schedule only
  diffusion.beta_end = 0.02  # linear schedule only
  diffusion.cosine_s = 0.008  # cosine schedule offset s
  diffusion.prediction = 'eps'  # what the network predicts: 'eps' | 'x0' | 'v' (ddpm formulation)
  # 'ddpm': discrete t, eps / x0 / v targets (diffusion/losses.py) | 'edm': Karras et al. 2022, a
  # preconditioned denoiser in continuous sigma (diffusion/edm.py). Both sample with every sampler
  # (an EDM model through the VP bridge on the schedule above; 'edm', EDM's own, for either).
  diffusion.formulation = 'ddpm'
  # ddpm only: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); 0 = off
  diffusion.min_snr_gamma = 0.0
  # ddpm only: the simple loss's error, 'l2' (DDPM's squared error) | 'l1' (LDM's loss_type: l1)
  diffusion.loss_type = 'l2'
  diffusion.sigma_data = 0.5  # edm: the data std its preconditioning assumes (EDM: 0.5)
  diffusion.p_mean = -1.2  # edm: training noise levels ln sigma ~ N(p_mean, p_std^2)
  diffusion.p_std = 1.2

  # ---------------------------------------------------------------- optimizer
  config.optim = optim = ml_collections.ConfigDict()
  # 'adam' | 'adamw' | 'adafactor' (optax.adafactor: factored second moments, no first moment,
  # about 1x the params in optimizer state instead of Adam's 2x; lr is absolute, as Adam's, with
  # no parameter-scale multiplier, updates clipped to RMS 1; b1, b2, eps, weight_decay unused)
  optim.optimizer = 'adam'
  optim.lr = 2e-4  # peak learning rate
  optim.warmup_steps = 5000  # linear warm-up from 0 to lr
  # after the warm-up: 'constant' | 'cosine' | 'linear' (decays to 0 at training.num_steps)
  optim.lr_schedule = 'constant'
  optim.grad_clip = 1.0  # global grad-norm clip (0 = off)
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0  # adamw only

  # ---------------------------------------------------------------- training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global batch, split over all devices of all hosts
  training.num_steps = 800_000  # total optimizer steps
  training.log_every = 100  # console + metrics.jsonl + TensorBoard every N steps
  training.checkpoint_every = 10_000  # Orbax checkpoint every N steps (and always at the end)
  training.keep_checkpoints = 3  # how many recent checkpoints to keep
  training.sample_every = 10_000  # write a sample grid every N steps (0 = never)
  training.num_grid_samples = 64  # images in a training-time grid
  training.ema_rate = 0.9999  # EMA decay of the parameters used for sampling
  training.ema_warmup = False  # decay min(ema_rate, (1 + step) / (10 + step)) (LDM's LitEma)
  # classifier-free guidance: probability that an example's guided conditions (labels, text) are
  # all replaced by their null value in training (conditioning.py)
  training.cond_dropout = 0.1
  # train steps fused into one compiled call (lax.scan; unrolled on the CPU, where XLA runs the
  # step much slower inside a loop: compile time grows with it there)
  training.steps_per_dispatch = 1
  # FSDP (ZeRO-3): params, EMA and optimizer state sharded over all devices (each leaf on its
  # largest axis the device count divides; small leaves replicated), for a state that does not
  # fit one device; False replicates them (faster while it fits: no weight all-gathers)
  training.fsdp = False
  training.max_nonfinite_steps = 10  # stop after this many consecutive non-finite updates
  training.eval_every = 0  # in-loop FID every N steps (0 = never)
  training.eval_num_samples = 1000  # samples for the in-loop FID (small N biases FID upward)

  # ---------------------------------------------------------------- sampling
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = 'ddpm'  # a name in diffusion/samplers.py's SAMPLERS, or EDM's 'edm'
  sampling.num_steps = 1000  # sampler steps (ddpm with < T steps = respaced chain)
  # time grid, any sampler on any grid (diffusion/grids.py): 'leading' | 'trailing' | 'linspace'
  # | 'dpm' (leading without t = 0) | 'karras' (rho = 7, EDM's) | 'auto' (the sampler's default)
  sampling.spacing = 'auto'
  sampling.eta = 0.0  # DDIM stochasticity: 0 = deterministic, 1 = DDPM-like
  # EDM's stochastic churn for 'heun', 'euler' and 'edm' (diffusion/samplers.py's Churn): 0 = off.
  # sigma here is EDM's sqrt((1 - abar) / abar); the linear schedule spans 0.0100 to 157.4.
  sampling.s_churn = 0.0
  sampling.s_tmin = 0.0
  sampling.s_tmax = 1e9  # EDM's inf: above every sigma a schedule has
  sampling.s_noise = 1.0
  # sampler 'edm' (EDM's Heun; diffusion/edm.py): num_steps points of the rho grid from sigma_max
  # down to sigma_min, then 0 (2 num_steps - 1 evaluations; EDM's CIFAR-10: 18 steps, 35). A DDPM
  # model's grid is clamped to its schedule's sigma range and rounded to its steps.
  sampling.sigma_min = 0.002
  sampling.sigma_max = 80.0
  sampling.rho = 7.0
  sampling.clip_x0 = True  # clip predicted x0 to [-1, 1] at each step
  # ddim: recompute eps from the clipped x0 (diffusers' use_clipped_model_output); helps at high
  # guidance scales, where the raw eps overshoots. False = diffusers' default.
  sampling.use_clipped_model_output = False
  sampling.num_samples = 64  # images to generate in --mode sample
  sampling.batch_size = 64  # global sampling batch (split over devices)
  sampling.seed = 0  # sampling noise seed
  sampling.checkpoint_step = -1  # which checkpoint to restore (-1 = latest)
  sampling.use_ema = True  # sample with EMA params (else the raw params)
  sampling.guidance_scale = 1.0  # classifier-free guidance w: 0 = unconditional, 1 = plain conditional
  sampling.class_label = -1  # class to generate (-1 = cycle through all classes)
  # text models: the prompt of every sample; or a file of prompts, one per line, cycled over
  # the samples; both '' = the dataset's captions in order
  sampling.prompt = ''
  sampling.prompts_file = ''
  # text models with guidance_scale != 1: the prompt the guidance pushes away from ('' = the
  # empty prompt, i.e. plain classifier-free guidance)
  sampling.negative_prompt = ''
  sampling.init_image = ''  # img2img/inpainting input: PNG/JPEG path or .npz of images ('' = none)
  sampling.mask = ''  # inpainting mask image or .npz, white (>= 128) = known pixels kept ('' = none)
  sampling.strength = 0.8  # img2img (SDEdit): run the last int(strength*num_steps) steps; 0 = input
  sampling.resample = 1  # inpainting: RePaint repetitions of every step (1 = none)
  sampling.cond_image = ''  # image-conditional model: condition image(s) ('' = dataset low_res)
  sampling.cascade_base_config = ''  # cascade: config file of the base model ('' = no cascade)
  sampling.cascade_base_workdir = ''  # cascade: workdir of the base model's checkpoints

  # ---------------------------------------------------------------- evaluation
  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 50_000  # samples for --mode eval
  ev.batch_size = 256  # global batch for generation and Inception features
  ev.inception_weights = ''  # converted Inception .npz ('' = default cache path)
  ev.reference_stats = ''  # dataset statistics .npz ('' = default cache path for the dataset)
  ev.bpd_num_examples = 0  # >0: also report DDPM's bound in bits/dim on this many examples
  # text models: CLIP score (evaluation/clip.py) of the samples against their prompts, with the
  # CLIP model in this folder (Hugging Face CLIPModel layout); '' = not computed
  ev.clip_weights = ''

  return config
