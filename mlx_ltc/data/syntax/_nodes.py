"""Tree helpers shared by the python, javascript and java modules."""


def text(node, source) -> str:
    return source[node.start_byte : node.end_byte].decode("utf-8", "replace")


def keyword_nodes(root, source, pattern, keywords):
    """The tokens a keyword regex finds in the source, where the tree has them as keywords (not inside a
    string or comment): a C lookup per occurrence instead of a Python step per node of the tree."""
    for m in pattern.finditer(source):
        node = root.descendant_for_byte_range(m.start(), m.end())
        if node is not None and node.type in keywords:
            yield node


def keyword_statements(root, source, pattern, keyword, types):
    """The statements of `types` a keyword introduces, each once."""
    seen = set()
    for node in keyword_nodes(root, source, pattern, (keyword,)):
        parent = node.parent
        if parent is not None and parent.type in types and parent.id not in seen:
            seen.add(parent.id)
            yield parent


def with_leading_comments(nodes, row, comment_types=("comment",)):
    """(node, start) for each non-comment node of a block, start moved up over the comment lines directly
    above it (no blank line between). `row` is the last row before the block."""
    comment_start = comment_row = None
    for node in nodes:
        if node.type in comment_types:
            first = node.start_point.row
            if first <= row:  # trailing comment of the previous line
                comment_start = None
            elif comment_start is None or first != comment_row + 1:
                comment_start = node.start_byte
            comment_row = row = node.end_point.row
            continue
        adjacent = comment_start is not None and node.start_point.row == comment_row + 1
        yield node, comment_start if adjacent else node.start_byte
        comment_start = None
        row = node.end_point.row


def owner_returns(root, source, pattern, function_types, return_type="return_statement"):
    """Function node id -> its return statements, not counting those of nested functions."""
    by_function = {}
    for stmt in keyword_statements(root, source, pattern, "return", (return_type,)):
        owner = stmt.parent
        while owner is not None and owner.type not in function_types:
            owner = owner.parent
        if owner is not None:
            by_function.setdefault(owner.id, []).append(stmt)
    return by_function


def single_return(function, returns, source, skip=("comment",)):
    """The expression of a function's only return statement, or None."""
    stmts = returns.get(function.id, ())
    if len(stmts) != 1:
        return None
    values = [v for v in stmts[0].named_children if v.type not in skip]
    return text(values[0], source) if values else None
