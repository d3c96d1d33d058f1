package main

import (
	"context"
	"errors"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
)

// Commands that need the query and jobs client (landing separately).

func queryCommand(g *globals) *cobra.Command   { return &cobra.Command{Use: "query", Hidden: true} }
func jobCommand(g *globals) *cobra.Command     { return &cobra.Command{Use: "jobs", Hidden: true} }
func rolloutCommand(g *globals) *cobra.Command { return &cobra.Command{Use: "rollout", Hidden: true} }
func importCommand(g *globals) *cobra.Command  { return &cobra.Command{Use: "import", Hidden: true} }
func exportCommand(g *globals) *cobra.Command  { return &cobra.Command{Use: "export", Hidden: true} }

func (g *globals) queryIDs(ctx context.Context, c *service.Client, q string) ([]string, error) {
	return nil, errors.New("--query needs the query client")
}
