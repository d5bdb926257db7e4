//go:build tools

// Package testenv pins the Go programs that make up the kmm-rs test control
// plane. Nothing imports this file; its blank imports keep the modules and
// their exact versions in go.mod/go.sum so build.sh can build them offline
// from the module cache.
package testenv

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "helm.sh/helm/v3/cmd/helm"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
