/**
 * Gradient kernels that @tensorflow/tfjs-backend-wasm 4.22 lacks and that training conv layers
 * needs: Conv2DBackpropFilter, DepthwiseConv2dNativeBackpropFilter and
 * DepthwiseConv2dNativeBackpropInput (checked with tf.getKernel: every other kernel on
 * MobileNetV2's backward path -- Conv2DBackpropInput, FusedBatchNorm, Relu6's Step/Select, Pad,
 * AvgPool -- is there).
 *
 * Each kernel is composed of wasm ops that exist (strided slices, pads, one matmul per filter tap),
 * so the heavy lifting stays in XNNPACK: a 1x1 pointwise convolution -- most of MobileNetV2's
 * weights -- becomes one [ci, N] x [N, co] matmul. bench/finetune.ts measured this against moving
 * the trainable part to the cpu backend (see its JSON); wasm with these kernels is the faster one.
 *
 * Ops run inside a kernel are not recorded on the gradient tape (the engine stops recording while
 * kernelDepth > 0), and every intermediate is disposed by tf.tidy; the returned tensor is the output.
 */
import * as tf from "@tensorflow/tfjs";

type Pad = "valid" | "same" | number | tf.backend_util.ExplicitPadding;

/** A kernel input as a Tensor (ops hand Tensors in; a bare TensorInfo gets a Tensor view). */
function asTensor(info: tf.TensorInfo): tf.Tensor {
  if (info instanceof tf.Tensor) return info;
  return tf.engine().makeTensorFromTensorInfo(info);
}

function pair(v: number | [number, number] | undefined): [number, number] {
  if (v === undefined) return [1, 1];
  return typeof v === "number" ? [v, v] : v;
}

/**
 * The input rows/columns each filter tap sees: for tap (kh, kw), a [B, outH, outW, C] strided view
 * of the zero-padded input. `taps[kh * fw + kw]`.
 */
function tapViews(x: tf.Tensor4D, info: tf.backend_util.Conv2DInfo): tf.Tensor4D[] {
  const { padInfo, strideHeight: sh, strideWidth: sw, dilationHeight: dh, dilationWidth: dw, filterHeight: fh, filterWidth: fw, outHeight: oh, outWidth: ow } = info;
  const [b, h, w, c] = x.shape;
  const needH = (fh - 1) * dh + sh * (oh - 1) + 1;
  const needW = (fw - 1) * dw + sw * (ow - 1) + 1;
  const bottom = Math.max(0, needH - h - padInfo.top);
  const right = Math.max(0, needW - w - padInfo.left);
  const xp = padInfo.top || bottom || padInfo.left || right ? tf.pad(x, [[0, 0], [padInfo.top, bottom], [padInfo.left, right], [0, 0]]) : x;
  const views: tf.Tensor4D[] = [];
  for (let kh = 0; kh < fh; kh++)
    for (let kw = 0; kw < fw; kw++) {
      const r0 = kh * dh, c0 = kw * dw;
      if (sh === 1 && sw === 1) views.push(tf.slice(xp, [0, r0, c0, 0], [b, oh, ow, c]));
      else views.push(tf.stridedSlice(xp, [0, r0, c0, 0], [b, r0 + sh * (oh - 1) + 1, c0 + sw * (ow - 1) + 1, c], [1, sh, sw, 1]) as tf.Tensor4D);
    }
  return views;
}

/** dW[kh,kw,ci,co] = sum over batch and output positions of x(tap view) * dy. */
function conv2DBackpropFilter({ inputs, attrs }: { inputs: tf.NamedTensorInfoMap; attrs?: tf.NamedAttrMap }): tf.Tensor {
  const a = attrs as unknown as { strides: number | [number, number]; pad: Pad; dataFormat: "NHWC" | "NCHW"; dimRoundingMode?: "floor" | "round" | "ceil"; filterShape: [number, number, number, number] };
  if (a.dataFormat === "NCHW") throw new Error("Conv2DBackpropFilter (ctrain wasm kernel): only NHWC is supported");
  return tf.tidy(() => {
    const x = asTensor(inputs["x"]!) as tf.Tensor4D;
    const dy = asTensor(inputs["dy"]!) as tf.Tensor4D;
    const info = tf.backend_util.computeConv2DInfo(x.shape, a.filterShape, a.strides, 1, a.pad, a.dimRoundingMode, false, "channelsLast");
    const [fh, fw, ci, co] = a.filterShape;
    const n = x.shape[0] * info.outHeight * info.outWidth;
    const dy2 = dy.reshape([n, co]);
    const perTap = tapViews(x, info).map((v) => tf.matMul(v.reshape([n, ci]), dy2, true, false));
    return (perTap.length === 1 ? perTap[0] : tf.stack(perTap)).reshape([fh, fw, ci, co]);
  });
}

/** dW[kh,kw,ci,m] = sum over batch and output positions of x(tap view)[ci] * dy[ci*M + m]. */
function depthwiseBackpropFilter({ inputs, attrs }: { inputs: tf.NamedTensorInfoMap; attrs?: tf.NamedAttrMap }): tf.Tensor {
  const a = attrs as unknown as { strides: number | [number, number]; dilations: number | [number, number]; pad: Pad; dimRoundingMode?: "floor" | "round" | "ceil"; filterShape: [number, number, number, number] };
  return tf.tidy(() => {
    const x = asTensor(inputs["x"]!) as tf.Tensor4D;
    const dy = asTensor(inputs["dy"]!) as tf.Tensor4D;
    const info = tf.backend_util.computeConv2DInfo(x.shape, a.filterShape, a.strides, pair(a.dilations), a.pad, a.dimRoundingMode, true, "channelsLast");
    const [fh, fw, ci, m] = a.filterShape;
    const dy5 = m === 1 ? dy : dy.reshape([dy.shape[0], info.outHeight, info.outWidth, ci, m]);
    const perTap = tapViews(x, info).map((v) => (m === 1 ? tf.mul(v, dy5).sum([0, 1, 2]) : tf.mul(v.expandDims(4), dy5).sum([0, 1, 2])));
    return tf.stack(perTap).reshape([fh, fw, ci, m]);
  });
}

/**
 * dx = sum over filter taps of (dy * w[tap]) scattered back to the input positions the tap read:
 * zeros inserted between rows/columns for strides > 1, shifted by the tap offset, summed, then
 * the padding cropped away.
 */
function depthwiseBackpropInput({ inputs, attrs }: { inputs: tf.NamedTensorInfoMap; attrs?: tf.NamedAttrMap }): tf.Tensor {
  const a = attrs as unknown as { strides: number | [number, number]; dilations: number | [number, number]; pad: Pad; dimRoundingMode?: "floor" | "round" | "ceil"; inputShape: [number, number, number, number] };
  return tf.tidy(() => {
    const dy = asTensor(inputs["dy"]!) as tf.Tensor4D;
    const filter = asTensor(inputs["filter"]!) as tf.Tensor4D;
    const [b, h, w, ci] = a.inputShape;
    const [fh, fw, , m] = filter.shape;
    const info = tf.backend_util.computeConv2DInfo(a.inputShape, filter.shape, a.strides, pair(a.dilations), a.pad, a.dimRoundingMode, true, "channelsLast");
    const { padInfo, strideHeight: sh, strideWidth: sw, dilationHeight: dh, dilationWidth: dw, outHeight: oh, outWidth: ow } = info;
    const fullH = Math.max(padInfo.top + h, (fh - 1) * dh + oh * sh);
    const fullW = Math.max(padInfo.left + w, (fw - 1) * dw + ow * sw);
    const dy5 = m === 1 ? dy : dy.reshape([b, oh, ow, ci, m]);
    const parts: tf.Tensor4D[] = [];
    for (let kh = 0; kh < fh; kh++)
      for (let kw = 0; kw < fw; kw++) {
        const wk = filter.slice([kh, kw, 0, 0], [1, 1, ci, m]).reshape(m === 1 ? [ci] : [ci, m]);
        let t = (m === 1 ? tf.mul(dy5, wk) : tf.mul(dy5, wk).sum(-1)) as tf.Tensor4D;
        if (sh > 1 || sw > 1) {
          // Zero insertion: [B,oh,ow,C] -> [B,oh,1,ow,1,C] -> pad to [B,oh,sh,ow,sw,C] -> [B,oh*sh,ow*sw,C].
          t = tf.pad(t.reshape([b, oh, 1, ow, 1, ci]), [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1], [0, 0]]).reshape([b, oh * sh, ow * sw, ci]);
        }
        const r0 = kh * dh, c0 = kw * dw;
        parts.push(tf.pad(t, [[0, 0], [r0, fullH - r0 - oh * sh], [c0, fullW - c0 - ow * sw], [0, 0]]));
      }
    const sum = parts.length === 1 ? parts[0] : tf.addN(parts);
    return tf.slice(sum, [0, padInfo.top, padInfo.left, 0], [b, h, w, ci]);
  });
}

/** The kernels this module adds, by tfjs kernel name. */
export const WASM_TRAINING_KERNELS = {
  Conv2DBackpropFilter: conv2DBackpropFilter,
  DepthwiseConv2dNativeBackpropFilter: depthwiseBackpropFilter,
  DepthwiseConv2dNativeBackpropInput: depthwiseBackpropInput,
} as const;

/**
 * Registers the missing training kernels for `backendName` (default `wasm`). Idempotent; a kernel the
 * backend already has (a later tfjs-backend-wasm release) is left alone. Returns the names it added.
 */
export function registerWasmTrainingKernels(backendName = "wasm"): string[] {
  const added: string[] = [];
  for (const [kernelName, fn] of Object.entries(WASM_TRAINING_KERNELS)) {
    if (tf.getKernel(kernelName, backendName)) continue;
    tf.registerKernel({ kernelName, backendName, kernelFunc: fn as unknown as tf.KernelFunc });
    added.push(kernelName);
  }
  return added;
}
