// Package deploy holds the deployment test tier (build tag deploy, `make
// test-deploy`): the Ansible roles applied for real to systemd-nspawn
// containers booted from a cached mmdebstrap rootfs (deploy/rootfs.sh).
package deploy
