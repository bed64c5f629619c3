// Validates KEDA objects against KEDA's own CRD schemas (the @kubernetes-models/keda package,
// pinned in package.json). Reads a JSON array of objects on stdin; prints a JSON array with one
// error message (or null) per object. Exit 0 unless the input itself is unusable.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ScaledJob } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/ScaledJob": ScaledJob,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((object) => {
  const Model = MODELS[`${object.apiVersion}/${object.kind}`];
  if (!Model) return `no KEDA schema for ${object.apiVersion} ${object.kind}`;
  try {
    new Model(object).validate();
    return null;
  } catch (error) {
    return String(error.message);
  }
});
process.stdout.write(JSON.stringify(results));
