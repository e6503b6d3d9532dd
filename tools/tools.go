//go:build tools

package tools

import (
	_ "github.com/coreos/go-systemd/v22/daemon"
	_ "github.com/go-git/go-billy/v5"
	_ "github.com/hashicorp/golang-lru/v2"
	_ "github.com/hashicorp/memberlist"
	_ "github.com/mistifyio/go-zfs/v3"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/spf13/cobra"
	_ "github.com/spf13/viper"
	_ "github.com/willscott/go-nfs"
	_ "github.com/willscott/go-nfs-client/nfs"
	_ "golang.org/x/sys/unix"
	_ "gopkg.in/yaml.v3"
	_ "modernc.org/sqlite"
)
