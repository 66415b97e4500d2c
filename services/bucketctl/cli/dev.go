package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newDevCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "dev",
		Short: "Run etcd, the allocator, the upload service and 3 local S3 buckets in one process",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return fmt.Errorf("dev stack not wired yet")
		},
	}
}
