/**
 * How [0, 255] RGB pixels become a model's input (the models' own modes). Its own module, free of the
 * inference engines, so the batch-preparation thread (core/training/batch_prep_worker.ts) loads only tfjs.
 */
import * as tf from "@tensorflow/tfjs";
import type { Preprocessing } from "./model_zoo.js";

/** Scales a batch of [0, 255] RGB pixels the way the model was trained. */
export function preprocess(x: tf.Tensor4D, mode: Preprocessing): tf.Tensor4D {
  return tf.tidy(() => {
    const f = x.toFloat();
    switch (mode) {
      case "unit":
        return f.div(255) as tf.Tensor4D;
      case "tf":
        return f.div(127.5).sub(1) as tf.Tensor4D;
      case "caffe": {
        const bgr = tf.reverse(f, -1);
        return bgr.sub(tf.tensor1d([103.939, 116.779, 123.68])) as tf.Tensor4D;
      }
      case "torch":
        return f.div(255).sub(tf.tensor1d([0.485, 0.456, 0.406])).div(tf.tensor1d([0.229, 0.224, 0.225])) as tf.Tensor4D;
      case "none":
        return f as tf.Tensor4D;
    }
  });
}
