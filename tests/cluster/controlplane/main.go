// Command controlplane is one multi-call binary (as k3s does) holding etcd,
// kube-apiserver, kube-controller-manager and kube-scheduler, all built from
// their upstream Go modules. One binary shares the (large) dependency graph,
// so a cold build compiles it once instead of four times.
//
// Usage: controlplane <etcd|kube-apiserver|kube-controller-manager|kube-scheduler> [flags...]
package main

import (
	"fmt"
	"os"
	_ "time/tzdata" // CronJob time zones, as upstream's mains do

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: controlplane <etcd|kube-apiserver|kube-controller-manager|kube-scheduler> [flags...]")
		os.Exit(2)
	}
	component := os.Args[1]
	// Each component parses os.Args[1:] itself: drop our sub-command word so
	// its flag parser sees only its own flags.
	os.Args = append([]string{component}, os.Args[2:]...)
	switch component {
	case "etcd":
		etcdmain.Main(os.Args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	default:
		fmt.Fprintf(os.Stderr, "unknown component %q\n", component)
		os.Exit(2)
	}
}
