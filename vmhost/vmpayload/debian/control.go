package debian

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"
)

// Field is one field of a deb822 paragraph, in file order.
type Field struct {
	Name  string
	Value string // continuation lines joined with "\n", leading space kept
}

// Paragraph is one stanza of a deb822 file (control, Packages, Release).
type Paragraph []Field

// Get returns the value of a field (case-insensitive name), "" if absent.
func (p Paragraph) Get(name string) string {
	for _, f := range p {
		if strings.EqualFold(f.Name, name) {
			return f.Value
		}
	}
	return ""
}

// String renders the paragraph as deb822 text, ending with a newline.
func (p Paragraph) String() string {
	var b strings.Builder
	for _, f := range p {
		b.WriteString(f.Name)
		b.WriteString(":")
		if f.Value != "" && !strings.HasPrefix(f.Value, "\n") {
			b.WriteString(" ")
		}
		b.WriteString(f.Value)
		b.WriteString("\n")
	}
	return b.String()
}

// ParseParagraphs parses deb822 text: paragraphs separated by blank lines,
// "Name: value" fields, continuation lines starting with a space or tab.
func ParseParagraphs(data []byte) ([]Paragraph, error) {
	var out []Paragraph
	var cur Paragraph
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	line := 0
	for sc.Scan() {
		line++
		l := sc.Text()
		if strings.TrimSpace(l) == "" {
			if len(cur) > 0 {
				out = append(out, cur)
				cur = nil
			}
			continue
		}
		if l[0] == ' ' || l[0] == '\t' {
			if len(cur) == 0 {
				return nil, fmt.Errorf("line %d: continuation line without a field", line)
			}
			cur[len(cur)-1].Value += "\n" + l
			continue
		}
		if l[0] == '#' {
			continue
		}
		name, value, ok := strings.Cut(l, ":")
		if !ok {
			return nil, fmt.Errorf("line %d: %q is not a field", line, l)
		}
		cur = append(cur, Field{Name: name, Value: strings.TrimSpace(value)})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out, nil
}
