#!/usr/bin/env bash
# Downloads the released Stable Cascade weights into models/ (resumable; HF_TOKEN is sent when set).
#
#   bash models/download_models.sh [essential] <big-big|big-small|small-big|small-small> [bfloat16|float32]
#   bash models/download_models.sh controlnet [canny] [inpainting] [super_resolution] [saliency]   (default: all)
#   bash models/download_models.sh clip        # CLIP bigG text encoder + ViT-L/14 image encoder (+ tokenizer)
#
# `essential` adds Stage A, the Previewer and the EfficientNet encoder; the variant names Stage B, then Stage C
# (B: big = 1.5B, small = 700M; C: big = 3.6B, small = 1B "lite"); precision defaults to bfloat16.
# Environment: HF_TOKEN (auth), HF_ENDPOINT (mirror; default https://huggingface.co), DRY_RUN=1 (print only).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
endpoint="${HF_ENDPOINT:-https://huggingface.co}"
repo="stabilityai/stable-cascade"

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

fetch() {  # fetch <url> <destination>: resumable, atomic (a partial file never has the final name)
  local url="$1" dest="$2" part="$2.part"
  if [ -s "$dest" ]; then echo "have  $dest"; return 0; fi
  if [ -n "${DRY_RUN:-}" ]; then echo "$url -> $dest"; return 0; fi
  mkdir -p "$(dirname "$dest")"
  echo "get   $url"
  local auth=()
  [ -n "${HF_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $HF_TOKEN")
  if ! curl -fL --retry 3 --connect-timeout 20 -C - "${auth[@]}" -o "$part" "$url"; then
    echo "error: download failed: $url" >&2
    echo "       check your network connection (or HF_ENDPOINT), and HF_TOKEN if the repository asks you to log in;" >&2
    echo "       run the same command again to resume ($part keeps what arrived)." >&2
    exit 1
  fi
  mv "$part" "$dest"
}

weights() { fetch "$endpoint/$repo/resolve/main/$1" "$here/$1"; }
saliency_url="https://raw.githubusercontent.com/Stability-AI/StableCascade/6c695205823039da56845b39d55f2c1d853535e4/modules/cnet_modules/inpainting/saliency_model.pt"
saliency_sha256=225a602e1f2a5d159424be011a63b27d83b56343a4379a90710eca9a26bab920

snapshot() {  # snapshot <hf repo id> <folder>: config, tokenizer and safetensors weights of a transformers model
  local id="$1" dest="$here/$2"
  if [ -n "${DRY_RUN:-}" ]; then echo "$endpoint/$id -> $dest"; return 0; fi
  local py="$here/../.venv/bin/python"; [ -x "$py" ] || py=python3
  if ! "$py" - "$id" "$dest" <<'EOF'
import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[1], local_dir=sys.argv[2], allow_patterns=["*.json", "*.txt", "*.safetensors"],
                  ignore_patterns=["open_clip*", "*.msgpack", "*.h5"])
EOF
  then
    echo "error: could not download $id into $dest (network, HF_ENDPOINT or HF_TOKEN); run again to resume." >&2
    exit 1
  fi
}

[ $# -ge 1 ] || usage
case "$1" in
  controlnet)
    shift
    names=("$@"); [ ${#names[@]} -gt 0 ] || names=(canny inpainting super_resolution saliency)
    for n in "${names[@]}"; do
      case "$n" in canny|inpainting|super_resolution) weights "controlnet/$n.safetensors" ;;
        saliency)  # the inpainting filter's saliency network, a pickle in upstream's git repository (read weights-only)
          fetch "$saliency_url" "$here/controlnet/saliency_model.pt"
          if [ -z "${DRY_RUN:-}" ] && command -v sha256sum >/dev/null &&
             ! echo "$saliency_sha256  $here/controlnet/saliency_model.pt" | sha256sum -c --quiet -; then
            echo "error: $here/controlnet/saliency_model.pt does not match its checksum; delete it and run again" >&2
            exit 1
          fi ;;
        *) echo "error: unknown ControlNet file '$n' (canny, inpainting, super_resolution, saliency)" >&2; exit 2 ;;
      esac
    done
    exit 0 ;;
  clip)
    snapshot laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text_encoder
    snapshot openai/clip-vit-large-patch14 image_encoder
    exit 0 ;;
  essential)
    weights stage_a.safetensors; weights previewer.safetensors; weights effnet_encoder.safetensors
    shift ;;
esac

[ $# -ge 1 ] || exit 0
variant="$1"; precision="${2:-bfloat16}"
case "$precision" in bfloat16) sfx="_bf16" ;; float32) sfx="" ;;
  *) echo "error: unknown precision '$precision' (bfloat16 or float32)" >&2; exit 2 ;; esac
case "$variant" in
  big-big) b=stage_b; c=stage_c ;;
  big-small) b=stage_b; c=stage_c_lite ;;
  small-big) b=stage_b_lite; c=stage_c ;;
  small-small) b=stage_b_lite; c=stage_c_lite ;;
  *) echo "error: unknown variant '$variant' (big-big, big-small, small-big, small-small)" >&2; exit 2 ;;
esac
weights "$b$sfx.safetensors"
weights "$c$sfx.safetensors"
if [ "$precision" = float32 ]; then
  echo "note: the configs in configs/inference/ name the _bf16 files; point generator_checkpoint_path at $b.safetensors / $c.safetensors"
fi
