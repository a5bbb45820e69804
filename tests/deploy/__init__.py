"""What a cluster is given: the Helm chart, the manifests, the monitoring bundle, the
package and image, and sidecar injection (the pod function, `refresher inject` and the
webhook). They share the rendering and schema-validation helpers and `make validate`."""
