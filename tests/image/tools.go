//go:build tools

// Package tools records the umoci main package so that `go mod tidy` keeps its dependencies.
package tools

import _ "github.com/opencontainers/umoci/cmd/umoci"
