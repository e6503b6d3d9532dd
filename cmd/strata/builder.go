package main

import (
	"errors"

	"github.com/spf13/cobra"
)

func newBuilderCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "builder",
		Short: "Run the builder agent: mount the newest generation under the store dir and rotate",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return errors.New("builder: not implemented yet")
		},
	}
}
