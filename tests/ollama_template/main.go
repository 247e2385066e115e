// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama does (missing keys render as zero values),
// for tests/test_chat_template.py. Input on stdin: {"template": "...", "data": {"Messages": [{"Role": ..., "Content": ...}]}}.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

func main() {
	var input struct {
		Template string         `json:"template"`
		Data     map[string]any `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		fmt.Fprintln(os.Stderr, "input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("TEMPLATE").Option("missingkey=zero").Parse(input.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	if err := tmpl.Execute(os.Stdout, input.Data); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
}
