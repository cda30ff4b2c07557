#!/usr/bin/env bash
# Reconstruction and LDM quality of each first stage, {kl, vq} x {no perceptual, perceptual}
# x latent {7x7x4, 7x7x2, 4x4x4}: docs/results.md, "The first stage". Each is followed by an
# LDM with the same budget, then `evaluate` (reconstruction MSE/PSNR/rFID and the LDM's FID).
#
#   bash scripts/autoencoder_sweep.sh [ROOT=runs/ae] [AE_STEPS=500] [LDM_STEPS=500] [NUM=500]
#
# LDM_STEPS=0 trains and evaluates the first stages only; LDM_ONLY="kl_7x7x4_p0 ..." trains
# LDMs for those runs only; LATENTS="7x7x4 ..." picks latents; PERCEPTUAL sets the weight
# of the perceptual rows (1.0). Each run resumes if rerun (the train CLI resumes or says the
# stage is already trained; evaluate reuses its saved samples).
set -euo pipefail
ROOT=${1:-runs/ae}
AE_STEPS=${2:-500}
LDM_STEPS=${3:-500}
NUM=${4:-500}
PERCEPTUAL=${PERCEPTUAL:-1.0}
mkdir -p "$ROOT"

latent_flags() {  # 7x7x4 | 7x7x2 | 4x4x4 -> VAE overrides
  case "$1" in
    7x7x4) echo "--config.model.latent_ch=4" ;;
    7x7x2) echo "--config.model.latent_ch=2" ;;
    4x4x4) echo "--config.model.latent_ch=4 --config.model.channels=(16,32,32)" ;;
  esac
}

for latent in ${LATENTS:-7x7x4 7x7x2 4x4x4}; do
  for reg in kl vq; do
    for perc in 0 "$PERCEPTUAL"; do
      name="${reg}_${latent}_p${perc}"
      w="$ROOT/$name"
      echo "== $name" >&2
      # shellcheck disable=SC2046
      python -m ldm_jax.train --stage=vae --preset=cpu-quick --workdir="$w" \
        --config.autoencoder.reg="$reg" --config.loss.perceptual_weight="$perc" \
        --config.train.steps="$AE_STEPS" $(latent_flags "$latent")
      if [ "$LDM_STEPS" -gt 0 ] && { [ -z "${LDM_ONLY:-}" ] || [[ " $LDM_ONLY " == *" $name "* ]]; }; then
        python -m ldm_jax.train --stage=ldm --preset=cpu-quick --workdir="$w" \
          --config.train.steps="$LDM_STEPS"
      fi
      python -m ldm_jax.evaluate --workdir="$w" --preset=cpu-quick --num="$NUM" --nocost
    done
  done
done

python - "$ROOT" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "eval", "metrics.json"))):
    r = json.load(open(path))
    a, q = r["autoencoder"], r["quality"].get("ldm", {})
    rows.append((a["reg"], "x".join(map(str, a["latent_shape"])), a["perceptual_weight"],
                 a["mse"], a["psnr"], a["rfid"], a.get("perplexity"), a.get("codes_used"),
                 q.get("fid"), q.get("precision"), q.get("recall")))
print("| reg | latent | perceptual | MSE | PSNR dB | rFID | perplexity | codes used | LDM FID | LDM precision | LDM recall |")
print("|---" * 11 + "|")
f = lambda v, d: "–" if v is None else f"{v:.{d}f}"
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:g} | {r[3]:.5f} | {r[4]:.2f} | {r[5]:.2f} | {f(r[6], 1)} | "
          f"{f(r[7], 2)} | {f(r[8], 1)} | {f(r[9], 3)} | {f(r[10], 3)} |")
PY
